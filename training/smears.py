"""`cellwatch-train groups`: which ALL-IDB1 smear each ALL-IDB2 crop was cut from.

ALL-IDB2's crops are cut from ALL-IDB1's whole-field images, but the two sets are
numbered independently, so no name says which. Each crop is looked for in every
whole-field image by normalised cross-correlation (OpenCV's matchTemplate,
TM_CCOEFF_NORMED) on grey images reduced by SCALE, in the 4 quarter turns and their
mirror images. A crop belongs to the smear with the best score when that score is at
least MATCH_MIN; it is **ambiguous** when another smear scores within
AMBIGUITY_MARGIN of it (both are reported; the crop gets the best one), and
**unmatched** below MATCH_MIN (it gets a group of its own, and is reported).

The result is a groups file for `prepare --groups` (groups.py): `path,group`, one row
per crop, the group being the smear's file name. ALL-IDB1 holds several smears per
patient, which no file says either: merge smears of one patient in the file by hand
when you know them.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cellwatch.training.dataset import find_images, relative
from cellwatch.training.errors import DataError
from cellwatch.training.progress import track

log = logging.getLogger(__name__)

SCALE = 4
"""Both images are reduced by this factor before matching (a 257 px crop -> 64 px)."""
MATCH_MIN = 0.8
"""Lowest normalised correlation at which a crop is taken to come from a smear."""
AMBIGUITY_MARGIN = 0.02
"""A second smear scoring within this of the best makes the match ambiguous."""
UNMATCHED_PREFIX = "unmatched:"


@dataclass(frozen=True)
class Match:
    crop: str
    smear: str | None
    score: float
    runner_up: str | None = None
    runner_up_score: float | None = None

    @property
    def ambiguous(self) -> bool:
        return (
            self.smear is not None
            and self.runner_up_score is not None
            and self.runner_up_score >= self.score - AMBIGUITY_MARGIN
        )


@dataclass
class Matches:
    matches: list[Match] = field(default_factory=list)

    @property
    def unmatched(self) -> list[Match]:
        return [m for m in self.matches if m.smear is None]

    @property
    def ambiguous(self) -> list[Match]:
        return [m for m in self.matches if m.ambiguous]

    def group_of(self, m: Match) -> str:
        return m.smear if m.smear is not None else f"{UNMATCHED_PREFIX}{m.crop}"


def _grey(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError(f"cannot decode {path}")
    h, w = image.shape
    return np.asarray(
        cv2.resize(image, (max(1, w // SCALE), max(1, h // SCALE)), interpolation=cv2.INTER_AREA)
    )


def _orientations(image: np.ndarray) -> list[np.ndarray]:
    out = []
    for mirrored in (image, image[:, ::-1]):
        out += [np.ascontiguousarray(np.rot90(mirrored, k)) for k in range(4)]
    return out


def match_crops(idb1: Path, idb2: Path) -> Matches:
    """Match every image of idb2 (crops) against every image of idb1 (whole fields)."""
    fields_scan, crops_scan = find_images(idb1), find_images(idb2)
    fields = {relative(fields_scan, c): _grey(c.path) for c in fields_scan.candidates}
    found = Matches()
    for cand in track(crops_scan.candidates, "matching crops"):
        name = relative(crops_scan, cand)
        turns = _orientations(_grey(cand.path))
        scores: dict[str, float] = {}
        for smear, image in fields.items():
            best = -1.0
            for t in turns:
                if t.shape[0] > image.shape[0] or t.shape[1] > image.shape[1]:
                    continue
                best = max(
                    best, float(cv2.minMaxLoc(cv2.matchTemplate(image, t, cv2.TM_CCOEFF_NORMED))[1])
                )
            scores[smear] = best
        ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
        top, score = ranked[0] if ranked else (None, -1.0)
        second = ranked[1] if len(ranked) > 1 else (None, None)
        found.matches.append(
            Match(
                crop=name,
                smear=top if score >= MATCH_MIN else None,
                score=score,
                runner_up=second[0],
                runner_up_score=second[1],
            )
        )
    return found


def write_groups(idb1: Path, idb2: Path, out: Path, *, force: bool = False) -> Matches:
    """Match the crops and write out (a groups CSV for `prepare --groups`)."""
    if out.exists() and not force:
        raise DataError(f"{out} already exists (use --force to replace it)")
    found = match_crops(idb1, idb2)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group"])
        for m in found.matches:
            writer.writerow([m.crop, found.group_of(m)])
    tmp.replace(out)
    for m in found.unmatched:
        log.warning("no smear holds %s (best score %.2f < %.2f)", m.crop, m.score, MATCH_MIN)
    for m in found.ambiguous:
        log.warning(
            "%s matches %s (%.3f) and %s (%.3f) almost equally: put in %s",
            m.crop,
            m.smear,
            m.score,
            m.runner_up,
            m.runner_up_score,
            m.smear,
        )
    return found
