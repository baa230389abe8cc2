"""Near-duplicate images, found before the split and merged into one group by default.

Two detectors, either one suffices:
- the perceptual hash (groups.phash: 256-bit DCT hash in all 8 flips and quarter
  turns) catches re-encoded, resized, flipped, turned and recoloured copies;
- the cosine similarity of the network's own bottleneck features (the base's pooled
  vector, `prepare --checkpoint`, computed into the same cache `fit` uses in
  bottleneck mode) catches what the hash misses: crops, small rotations, shifts,
  zooms and histogram equalisation, the augmented copies the 2018 workflow saved.
  Features are standardised per dimension over the data set before the cosine (a
  base network's features share a large common component) and compared all against
  all.

`prepare` merges every pair into one group (union-find), so a copy can never sit in
another split than its original, and reports each merge; `--allow-near-duplicates`
keeps the older behaviour (each file its own group, pairs across splits warned
about, refused with --strict). Thresholds and the measured recall and false merges:
training/README.md ("Leakage") and tests/training/test_leakage.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from cellwatch.shared.base import Strict
from cellwatch.training.groups import PHASH_MAX_DISTANCE, hash_bytes
from cellwatch.training.unionfind import DisjointSets

log = logging.getLogger(__name__)

COSINE_MIN = 0.9
"""Standardised bottleneck cosine at or above which two images are one source. Measured
only with a random-weights base (no ImageNet checkpoint is available offline; README,
Leakage): distinct synthetic smears reached 0.86 at most; to be confirmed on ALL-IDB
with the published checkpoint."""
_CHUNK = 32


class Merge(Strict):
    """Two images put into one group, and why."""

    a: str
    b: str
    by: Literal["phash", "features"]
    distance: float = Field(description="pHash bits apart, or the centred cosine")


def phash_pairs(
    paths: Sequence[str],
    hashes: Sequence[Sequence[str] | None],
    max_distance: int = PHASH_MAX_DISTANCE,
) -> list[Merge]:
    """Every pair (all against all) whose pHash differs by <= max_distance bits in some
    flip or turn of the first image."""
    keep = [i for i, h in enumerate(hashes) if h]
    if len(keep) < 2:
        return []
    all_hashes = hash_bytes([hashes[i] or [] for i in keep])  # [N, 8, 32]
    first = all_hashes[:, 0]  # [N, 32]
    found: list[Merge] = []
    for start in range(0, len(keep), _CHUNK):
        chunk = all_hashes[start : start + _CHUNK]
        xor = chunk[:, :, None, :] ^ first[None, None, :, :]
        dist = np.bitwise_count(xor).sum(axis=3, dtype=np.int64).min(axis=1)  # [c, N]
        for ia, ib in zip(*np.nonzero(dist <= max_distance), strict=True):
            a, b = start + int(ia), int(ib)
            if a < b:
                found.append(
                    Merge(
                        a=paths[keep[a]], b=paths[keep[b]], by="phash", distance=int(dist[ia, ib])
                    )
                )
    return found


def centred_cosine(features: np.ndarray) -> np.ndarray:
    """[N, N] cosine similarity of the features standardised per dimension (the data set's
    mean subtracted, divided by its standard deviation): a component all images share,
    and dimensions that are large everywhere, do not make distinct images alike."""
    f = np.asarray(features, np.float64)
    f = (f - f.mean(axis=0, keepdims=True)) / (f.std(axis=0, keepdims=True) + 1e-6)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    out: np.ndarray = f @ f.T
    return out


def feature_pairs(
    paths: Sequence[str], features: np.ndarray, threshold: float = COSINE_MIN
) -> list[Merge]:
    """Every pair whose centred bottleneck cosine is at least threshold."""
    if len(paths) < 3:  # centring needs a few images to mean anything
        return []
    cos = centred_cosine(features)
    found = []
    for a, b in zip(*np.nonzero(np.triu(cos >= threshold, k=1)), strict=True):
        found.append(
            Merge(a=paths[int(a)], b=paths[int(b)], by="features", distance=float(cos[a, b]))
        )
    return found


def merged_groups(groups: dict[str, str], merges: Sequence[Merge]) -> dict[str, str]:
    """path -> group after merging each pair's groups (union-find; the smallest group id
    of a merged set names it, so the result does not depend on the order of pairs)."""
    sets = DisjointSets()
    for m in merges:
        ra, rb = sets.find(groups[m.a]), sets.find(groups[m.b])
        sets.join(max(ra, rb), min(ra, rb))
    return {path: sets.find(g) for path, g in groups.items()}
