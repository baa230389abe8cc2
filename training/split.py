"""`prepare`: a stratified train/val/test split by source image, written as split.json.

The split is made from the original files, before any augmentation (augmentation
happens on the fly during `fit`, on training images only), and by source image:
files with the same name stem (Im001_1.jpg / Im001_1.tif) or identical bytes are
one group and always land in the same split. This is what the original workflow got
wrong: it augmented first and split afterwards, so copies of a training image sat
in the validation set.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellwatch.training import LABELS
from cellwatch.training.dataset import ImageEntry, Skipped, find_images, fingerprint, inspect
from cellwatch.training.errors import DataError
from cellwatch.training.outdir import staged_dir

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
SplitName = Literal["train", "val", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "val", "test")


class SplitFile(BaseModel):
    """split.json: which image is in which split, and fingerprints of each."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["cellwatch.split/1"] = Field("cellwatch.split/1", alias="schema")
    created_at: datetime
    data_root: str = Field(description="absolute path of the data folder")
    layout: str
    synthetic: bool = Field(description="true when the data came from `cellwatch-train synth`")
    labels: list[str] = Field(default_factory=lambda: list(LABELS))
    seed: int = Field(ge=0)
    val_fraction: float = Field(ge=0.0, lt=1.0)
    test_fraction: float = Field(ge=0.0, lt=1.0)
    splits: dict[SplitName, list[ImageEntry]]
    fingerprints: dict[str, str] = Field(description="per split and `all` (dataset.fingerprint)")
    skipped: list[Skipped] = Field(default_factory=list, description="files that did not decode")

    @property
    def root(self) -> Path:
        return Path(self.data_root)

    def entries(self, split: SplitName) -> list[ImageEntry]:
        return list(self.splits.get(split, []))

    def class_counts(self, split: SplitName) -> dict[str, int]:
        counts = {name: 0 for name in self.labels}
        for e in self.entries(split):
            counts[self.labels[e.label]] += 1
        return counts


def stratified_split(
    entries: list[ImageEntry], val: float, test: float, seed: int
) -> dict[SplitName, list[ImageEntry]]:
    """Split groups of each class by the fractions; every non-zero split gets each class."""
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise DataError(f"--val {val} and --test {test} must be >= 0 and sum to less than 1")
    groups = _groups(entries)
    present = {lab for members in groups.values() for lab in {e.label for e in members}}
    if len(present) < len(LABELS):
        have = ", ".join(LABELS[i] for i in sorted(present)) or "none"
        raise DataError(f"the data has one class only ({have}); both normal and ALL are needed")
    rng = np.random.default_rng(seed)
    out: dict[SplitName, list[ImageEntry]] = {name: [] for name in SPLIT_NAMES}
    for label, name in enumerate(LABELS):
        keys = sorted(k for k, members in groups.items() if members[0].label == label)
        order = [keys[i] for i in rng.permutation(len(keys))]
        n_test = max(1, round(test * len(keys))) if test > 0 else 0
        n_val = max(1, round(val * len(keys))) if val > 0 else 0
        if len(keys) - n_test - n_val < 1:
            raise DataError(
                f"split too small: class {name!r} has {len(keys)} source images, fewer than "
                f"{n_test + n_val + 1} needed for --val {val} and --test {test} "
                "(one each in every split)"
            )
        parts: dict[SplitName, list[str]] = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        for split, split_keys in parts.items():
            out[split] += [e for k in split_keys for e in groups[k]]
    return {name: sorted(items, key=lambda e: e.path) for name, items in out.items()}


def _groups(entries: list[ImageEntry]) -> dict[str, list[ImageEntry]]:
    """Union of same-name-stem and same-bytes entries; DataError if a group has two labels."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_hash: dict[str, str] = {}
    for e in entries:
        find(e.group)
        if e.sha256 in by_hash:
            parent[find(e.group)] = find(by_hash[e.sha256])
        else:
            by_hash[e.sha256] = e.group
    groups: dict[str, list[ImageEntry]] = {}
    for e in entries:
        groups.setdefault(find(e.group), []).append(e)
    for members in groups.values():
        if len({e.label for e in members}) > 1:
            names = ", ".join(e.path for e in members[:4])
            raise DataError(f"the same source image carries both labels: {names}")
    return groups


def prepare(
    data: Path, out: Path, *, val: float, test: float, seed: int, force: bool = False
) -> SplitFile:
    """Scan data, check every image, split, and write out/split.json (all or nothing)."""
    scan = find_images(data)
    named = {c.label for c in scan.candidates}
    if len(named) < len(LABELS):
        have = ", ".join(LABELS[i] for i in sorted(named))
        raise DataError(f"{data} holds one class only ({have}); both normal and ALL are needed")
    log.info(
        "%s: %s layout, %d image files%s",
        scan.root,
        scan.layout,
        len(scan.candidates),
        " (SYNTHETIC)" if scan.synthetic else "",
    )
    with staged_dir(out, marker=SPLIT_FILE, force=force, what="split") as tmp:
        entries, skipped = inspect(scan)
        if not entries:
            raise DataError(f"no image in {data} could be decoded ({len(skipped)} skipped)")
        splits = stratified_split(entries, val, test, seed)
        prints: dict[str, str] = {name: fingerprint(items) for name, items in splits.items()}
        prints["all"] = fingerprint(entries)
        split = SplitFile(
            created_at=datetime.now(UTC),
            data_root=str(scan.root),
            layout=scan.layout,
            synthetic=scan.synthetic,
            seed=seed,
            val_fraction=val,
            test_fraction=test,
            splits=splits,
            fingerprints=prints,
            skipped=skipped,
        )
        (tmp / SPLIT_FILE).write_text(split.model_dump_json(by_alias=True, indent=2) + "\n")
    for name in SPLIT_NAMES:
        log.info("%-5s %s", name, split.class_counts(name))
    return split


def load_split(path: Path) -> SplitFile:
    """Read a split directory (or its split.json)."""
    file = path / SPLIT_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{path} is not a split made by `cellwatch-train prepare` (no {SPLIT_FILE})"
        )
    try:
        return SplitFile.model_validate_json(file.read_bytes())
    except ValidationError as exc:
        raise DataError(f"{file} is not a valid split file: {exc.errors()[0]['msg']}") from exc
