"""Finding, checking and loading the images of a data folder.

Images are decoded with the node's own decoder (`cellwatch.node.decode.decode_image`,
same limits, same reduced-scale JPEG decode), so training sees exactly the pixels a
node will see. A file that does not decode is skipped with a warning and counted,
never a crash. Layouts: see `layout.py`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from cellwatch.node.decode import ImageError, ImageLimits, decode_image
from cellwatch.shared.base import Strict
from cellwatch.shared.schemas import Sha256
from cellwatch.training import IMAGE_SIZE, LABELS
from cellwatch.training.errors import DataError
from cellwatch.training.groups import phash
from cellwatch.training.layout import (
    ALLIDB_SUBFOLDERS,
    CLASS_FOLDER_ALIASES,
    SYNTHETIC_MARKER,
    allidb_label,
    class_folder_label,
    group_key,
    is_image,
    is_synthetic_file,
)
from cellwatch.training.progress import track

log = logging.getLogger(__name__)

LIMITS = ImageLimits()


class ImageEntry(Strict):
    """One usable image: where it is (relative to the data root), its class and its hash."""

    path: str = Field(min_length=1, description="POSIX path relative to the data root")
    label: int = Field(ge=0, lt=len(LABELS))
    sha256: Sha256
    size: int = Field(ge=1, description="file size in bytes")
    group: str = Field(
        min_length=1, description="source (file, or smear/patient from --groups): one split"
    )
    phash: list[str] | None = Field(
        None, description="perceptual hashes of the 8 flips/turns (groups.phash)"
    )
    fold: int | None = Field(None, ge=0, description="cross-validation fold (prepare --folds)")


class Skipped(Strict):
    path: str
    reason: str


@dataclass(frozen=True)
class Candidate:
    path: Path
    label: int
    group: str


@dataclass(frozen=True)
class Scan:
    """The image files a folder holds, with labels from its layout (nothing decoded yet)."""

    root: Path
    layout: str
    candidates: list[Candidate]
    synthetic: bool


def find_images(data: Path) -> Scan:
    """Detect the layout of data and list its images; DataError if it fits none."""
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist or is not a directory")
    root = data.resolve()
    synthetic = (root / SYNTHETIC_MARKER).is_file()
    files = sorted(p for p in root.iterdir() if is_image(p))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sub in ALLIDB_SUBFOLDERS:
        if not files and (root / sub).is_dir():
            log.info("using %s/ (ALL-IDB download layout)", sub)
            return find_images(root / sub)
    if files:
        if subdirs:
            log.info("ignoring sub-folders of %s: %s", root, ", ".join(p.name for p in subdirs))
        return Scan(root, _allidb_layout(files), _allidb_candidates(root, files), synthetic)
    if subdirs:
        return Scan(root, "class-folders", _class_folder_candidates(root, subdirs), synthetic)
    raise DataError(f"data folder {data} is empty (no JPEG, TIFF, PNG or BMP images)")


def _allidb_layout(files: list[Path]) -> str:
    suffixes = {p.suffix.lower() for p in files}
    if suffixes <= {".jpg", ".jpeg"}:
        return "ALL-IDB1"
    if suffixes <= {".tif", ".tiff"}:
        return "ALL-IDB2"
    return "ALL-IDB"


def _allidb_candidates(root: Path, files: list[Path]) -> list[Candidate]:
    bad = [p.name for p in files if allidb_label(p.name) is None]
    if bad:
        raise DataError(
            f"{len(bad)} image names in {root} fit no known layout (e.g. {', '.join(bad[:3])}); "
            "expected ALL-IDB names ImNNN_1.jpg/.tif (ALL) and ImNNN_0.jpg/.tif (normal), "
            "or one sub-folder per class"
        )
    return [Candidate(p, int(allidb_label(p.name) or 0), group_key(p)) for p in files]


def _class_folder_candidates(root: Path, subdirs: list[Path]) -> list[Candidate]:
    unknown = [d.name for d in subdirs if class_folder_label(d.name) is None]
    if unknown:
        names = ", ".join(sorted(CLASS_FOLDER_ALIASES))
        raise DataError(
            f"sub-folders of {root} fit no known layout: {', '.join(unknown[:3])} is not a class "
            f"name (known: {names}); ALL-IDB files must sit directly in the data folder"
        )
    found = []
    for d in subdirs:
        label = int(class_folder_label(d.name) or 0)
        found += [
            Candidate(p, label, f"{label}/{group_key(p)}")
            for p in sorted(d.iterdir())
            if is_image(p)
        ]
    if not found:
        raise DataError(f"data folder {root} is empty (its class folders hold no images)")
    return found


def relative(scan: Scan, cand: Candidate) -> str:
    """How split.json (and a groups file) names a candidate: POSIX path under the root."""
    return cand.path.relative_to(scan.root).as_posix()


@dataclass(frozen=True)
class Inspected:
    entries: list[ImageEntry]
    skipped: list[Skipped]
    synthetic: list[str]
    """Paths of the files that carry the synthetic tag (layout.SYNTHETIC_TAG)."""


def inspect(scan: Scan, groups: dict[str, str] | None = None) -> Inspected:
    """Hash and test-decode every candidate; undecodable files are skipped with a warning.

    groups (path -> group id, from a groups file) replaces the default file groups.
    """
    entries: list[ImageEntry] = []
    skipped: list[Skipped] = []
    synthetic: list[str] = []
    for cand in track(scan.candidates, "checking images"):
        rel = relative(scan, cand)
        try:
            data = cand.path.read_bytes()
            rgb = decode_image(data, LIMITS, target_size=IMAGE_SIZE)
        except (ImageError, OSError) as exc:
            log.warning("skipping %s: %s", rel, exc)
            skipped.append(Skipped(path=rel, reason=str(exc)))
            continue
        if is_synthetic_file(data):
            synthetic.append(rel)
        entries.append(
            ImageEntry(
                path=rel,
                label=cand.label,
                sha256=sha256_hex(data),
                size=len(data),
                group=f"group:{groups[rel]}" if groups is not None else cand.group,
                phash=phash(rgb),
            )
        )
    if skipped:
        log.warning(
            "%d of %d images could not be decoded and were skipped",
            len(skipped),
            len(scan.candidates),
        )
    return Inspected(entries, skipped, synthetic)


def load_rgb(root: Path, entry: ImageEntry) -> np.ndarray:
    """Decode one entry (RGB uint8), checking it is still the file that was prepared."""
    path = root / entry.path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    if sha256_hex(data) != entry.sha256:
        raise DataError(f"{path} changed since `prepare` (SHA-256 differs); run prepare again")
    try:
        return decode_image(data, LIMITS, target_size=IMAGE_SIZE)
    except ImageError as exc:  # it decoded during prepare, so the file or decoder changed
        raise DataError(f"{path} no longer decodes: {exc}") from exc


def fingerprint(entries: list[ImageEntry]) -> str:
    """SHA-256 over the sorted (content hash, label) pairs: names and paths do not matter."""
    lines = sorted(f"{e.sha256} {e.label}\n" for e in entries)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
