"""Which images belong together (a patient, a smear), and near-duplicates across splits.

A split must not put two images of one patient (or one smear) on both sides:
ALL-IDB2's crops are cut from ALL-IDB1's smears and ALL-IDB1 has several smears per
patient, but the file names do not say which (the two sets are numbered
independently). So:

- `prepare --groups groups.csv` maps every image to a group id (patient or smear);
  images of one group always land in the same split. The CSV has a header row with
  the columns `path` (relative to the data folder, as `split.json` lists it; for the
  flat ALL-IDB layouts simply the file name) and `group`. Every image must be listed
  and every listed file must exist; anything else is an error that names the files.
- Without it each file is its own group (identical bytes still merge), and
  `prepare` says that patients may leak across splits.
- Whatever the grouping, a perceptual hash (DCT pHash of the grey image, in all 8
  flips and quarter turns) finds near-duplicates that sit in different splits:
  re-encoded, resized, flipped, rotated or lightly recoloured copies, such as
  augmented images saved under new names. `prepare` warns about each pair, and
  `--strict` refuses the split. Crops of one image are not caught: that is what
  the groups file is for.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from cellwatch.shared.base import Strict
from cellwatch.training.errors import DataError

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "file")
GROUP_COLUMNS = ("group", "patient", "smear")
PHASH_BITS = 256
PHASH_MAX_DISTANCE = 24
"""Bits (of 256) two images' hashes may differ by and still count as near-duplicates.
Measured on 240 SYNTHETIC smears (which share layout and colours as real crops do):
distinct images differ by 60 bits or more (median 106); JPEG re-encoding at quality
70, flips, quarter turns, resizing, blur and brightness, contrast or tint changes by
4 or fewer."""
_HASH_SIDE = 64
_LOW = 16
_CHUNK = 32
"""Rows of `a` compared at once: 32 x 8 x B x 32 bytes of XOR (40 MB for 5000 images)."""


class NearDuplicate(Strict):
    a: str
    a_split: str
    b: str
    b_split: str
    distance: int


def read_groups(path: Path, images: Sequence[str]) -> dict[str, str]:
    """Image path -> group id from a CSV groups file; DataError on any mismatch."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read groups file {path}: {exc}") from exc
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise DataError(f"groups file {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    try:
        path_col = next(header.index(c) for c in PATH_COLUMNS if c in header)
        group_col = next(header.index(c) for c in GROUP_COLUMNS if c in header)
    except StopIteration:
        raise DataError(
            f"groups file {path} needs a header row with a `path` and a `group` column "
            f"(found {', '.join(header) or 'nothing'})"
        ) from None
    groups: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(path_col, group_col):
            raise DataError(f"{path}:{line}: expected a path and a group, got {row!r}")
        name, group = row[path_col].strip(), row[group_col].strip()
        if not name or not group:
            raise DataError(f"{path}:{line}: empty path or group")
        if groups.get(name, group) != group:
            raise DataError(f"{path}:{line}: {name} is listed with two groups")
        groups[name] = group
    known = set(images)
    unknown = sorted(set(groups) - known)
    missing = sorted(known - set(groups))
    if unknown:
        raise DataError(
            f"groups file {path} names {len(unknown)} files that are not images of the data "
            f"folder (e.g. {', '.join(unknown[:3])}); paths are relative to the data folder"
        )
    if missing:
        raise DataError(
            f"groups file {path} gives no group for {len(missing)} images "
            f"(e.g. {', '.join(missing[:3])}): every image needs one"
        )
    return groups


def phash(rgb: np.ndarray) -> list[str]:
    """256-bit DCT perceptual hashes (hex) of the image in its 8 flips and quarter turns:
    the signs of the 16x16 lowest frequencies of a 64x64 grey version against their median."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(grey, (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA)
    out = []
    for flip in (False, True):
        base = small[:, ::-1] if flip else small
        for k in range(4):
            low = cv2.dct(np.ascontiguousarray(np.rot90(base, k)))[:_LOW, :_LOW].reshape(-1)
            out.append(np.packbits(low > np.median(low[1:])).tobytes().hex())
    return out


def near_duplicates(
    splits: dict[str, Sequence[tuple[str, Sequence[str] | None]]],
    max_distance: int = PHASH_MAX_DISTANCE,
) -> list[NearDuplicate]:
    """Pairs of images in different splits whose hashes differ by <= max_distance bits.

    splits: split name -> [(path, its 8 hashes or None)]. The first hash of b is
    compared with all 8 of a, so a flipped or turned copy is still found.
    """
    names = list(splits)
    found: list[NearDuplicate] = []
    for i, name_a in enumerate(names):
        for name_b in names[i + 1 :]:
            a_items = [(p, h) for p, h in splits[name_a] if h]
            b_items = [(p, h) for p, h in splits[name_b] if h]
            if not a_items or not b_items:
                continue
            a_hashes = hash_bytes([h for _, h in a_items])  # [A, 8, 32]
            b_hashes = hash_bytes([h[:1] for _, h in b_items])[:, 0]  # [B, 32]
            for start in range(0, len(a_hashes), _CHUNK):
                chunk = a_hashes[start : start + _CHUNK]
                xor = chunk[:, :, None, :] ^ b_hashes[None, None, :, :]  # [a, 8, B, 32]
                dist = np.bitwise_count(xor).sum(axis=3, dtype=np.int64).min(axis=1)
                for ia, ib in zip(*np.nonzero(dist <= max_distance), strict=True):
                    found.append(
                        NearDuplicate(
                            a=a_items[start + ia][0],
                            a_split=name_a,
                            b=b_items[ib][0],
                            b_split=name_b,
                            distance=int(dist[ia, ib]),
                        )
                    )
    return found


def hash_bytes(hashes: Iterable[Sequence[str]]) -> np.ndarray:
    """Hex hashes [N][8] as bytes [N, 8, 32]."""
    return np.array(
        [[np.frombuffer(bytes.fromhex(h), np.uint8) for h in row] for row in hashes],
        dtype=np.uint8,
    )
