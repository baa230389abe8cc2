"""How `prepare` deals images to splits and folds: by group, stratified by class, seeded.

A group is the union of entries that share a group name (a file, or a patient or smear
from groups.csv) or identical bytes; `group_label` is the class a group counts for.
Pure functions of their entries and seed: no files are read or written here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from cellwatch.training import LABELS
from cellwatch.training.dataset import ImageEntry
from cellwatch.training.errors import DataError
from cellwatch.training.unionfind import DisjointSets

SplitName = Literal["train", "val", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "val", "test")


def stratified_split(
    entries: list[ImageEntry], val: float, test: float, seed: int
) -> dict[SplitName, list[ImageEntry]]:
    """Split the groups of each class (group_label) by the fractions; every non-zero split
    gets images of each class."""
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise DataError(f"--val {val} and --test {test} must be >= 0 and sum to less than 1")
    groups = _groups(entries)
    present = {e.label for e in entries}
    if len(present) < len(LABELS):
        have = ", ".join(LABELS[i] for i in sorted(present)) or "none"
        raise DataError(f"the data has one class only ({have}); both normal and ALL are needed")
    rng = np.random.default_rng(seed)
    out: dict[SplitName, list[ImageEntry]] = {name: [] for name in SPLIT_NAMES}
    for label, name in enumerate(LABELS):
        keys = sorted(k for k, members in groups.items() if group_label(members) == label)
        if not keys:  # every group of this class also holds the other one
            continue
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
    fractions = {"train": 1.0, "val": val, "test": test}
    for split, items in out.items():
        if fractions[split] > 0 and {e.label for e in items} != set(range(len(LABELS))):
            raise DataError(
                f"split too small: the {split} split got images of one class only "
                f"(too few groups for --val {val} and --test {test})"
            )
    return {name: sorted(items, key=lambda e: e.path) for name, items in out.items()}


def assign_folds(entries: list[ImageEntry], folds: int, seed: int) -> list[ImageEntry]:
    """entries with `fold` set: each class's groups dealt round-robin to folds in seeded order."""
    groups = _groups(entries)
    rng = np.random.default_rng([seed, 0xF01D])
    fold_of: dict[str, int] = {}
    for label, name in enumerate(LABELS):
        keys = sorted(k for k, members in groups.items() if group_label(members) == label)
        if keys and len(keys) < folds:
            raise DataError(
                f"too few groups for {folds} folds: class {name!r} has {len(keys)} outside "
                "the test split (one per fold needed)"
            )
        for i, j in enumerate(rng.permutation(len(keys))):
            fold_of[keys[j]] = i % folds
    out = [
        e.model_copy(update={"fold": fold_of[k]}) for k, members in groups.items() for e in members
    ]
    for fold in range(folds):
        if {e.label for e in out if e.fold == fold} != set(range(len(LABELS))):
            raise DataError(f"too few groups for {folds} folds: fold {fold} has one class only")
    return out


def group_label(members: list[ImageEntry]) -> int:
    """The class a group is stratified by: ALL if at least half its images are ALL.

    A patient's group may hold both classes (normal cells from a leukaemia smear);
    a file group always has one.
    """
    positives = sum(e.label for e in members)
    return 1 if 2 * positives >= len(members) else 0


def _groups(entries: list[ImageEntry]) -> dict[str, list[ImageEntry]]:
    """Union of same-group and same-bytes entries; DataError if one image has two labels."""
    sets = DisjointSets()
    by_hash: dict[str, str] = {}
    for e in entries:
        if e.sha256 in by_hash:
            sets.join(e.group, by_hash[e.sha256])
        else:
            by_hash[e.sha256] = e.group
    groups: dict[str, list[ImageEntry]] = {}
    for e in entries:
        groups.setdefault(sets.find(e.group), []).append(e)
    labels_of: dict[str, set[int]] = {}
    for e in entries:
        labels_of.setdefault(e.sha256, set()).add(e.label)
    for members in groups.values():
        clash = [e for e in members if len(labels_of[e.sha256]) > 1]
        if clash:
            names = ", ".join(e.path for e in clash[:4])
            raise DataError(f"the same image carries both labels: {names}")
    return groups
