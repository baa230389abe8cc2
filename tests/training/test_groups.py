"""Splits that cannot leak: a groups file keeps a patient or smear in one split,
near-duplicates across splits are found, K-fold cross-validation is grouped and
stratified, and every bad groups file is refused with a message naming the files."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellwatch.training.errors import DataError
from cellwatch.training.split import load_split, prepare
from cellwatch.training.stratify import SPLIT_NAMES
from cellwatch.training.synth import smear
from tests.training.helpers import (
    allidb,
    assert_one_line_error,
    nothing_written,
    train,
    write_images,
)


def write_smears(folder: Path, names: list[str], seed: int = 5) -> None:
    """ALL-IDB names, SYNTHETIC smear content (label from the name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        rgb = smear(int(name.split("_")[1][0]), seed, i)
        assert cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def groups_csv(path: Path, rows: dict[str, str], header: str = "path,group") -> Path:
    path.write_text(header + "\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    return path


def patients(names: list[str], size: int = 3) -> dict[str, str]:
    """Consecutive files share a patient; patients hold both classes."""
    return {name: f"p{i // size}" for i, name in enumerate(names)}


def test_a_patients_images_stay_in_one_split(tmp_path: Path) -> None:
    names = allidb(18)  # 36 files, 12 patients of 3 (mixed classes)
    write_images(tmp_path / "data", names)
    groups = patients(names)
    split = prepare(
        tmp_path / "data",
        tmp_path / "split",
        val=0.2,
        test=0.2,
        seed=1,
        groups_file=groups_csv(tmp_path / "groups.csv", groups),
    )
    assert split.grouping == "groups-file" and split.groups_file_sha256
    where: dict[str, set[str]] = {}
    for name in ("train", "val", "test"):
        for e in split.entries(name):
            where.setdefault(groups[e.path], set()).add(name)
    assert len(where) == 12 and all(len(s) == 1 for s in where.values())
    for split_name in SPLIT_NAMES:  # stratified by group: each split has both classes
        assert all(split.class_counts(split_name).values()), split_name


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ({"Im001_1.tif": "a"}, "path,group", "gives no group for 7 images"),
        ({"Im999_1.tif": "a"}, "path,group", "names 1 files that are not images"),
        ({}, "file;patient", "needs a header row with a `path` and a `group` column"),
        ({"Im001_1.tif": ""}, "path,group", "empty path or group"),
    ],
)
def test_bad_groups_files_are_refused(
    tmp_path: Path, rows: dict[str, str], header: str, message: str
) -> None:
    names = allidb(4)
    write_images(tmp_path / "data", names)
    full = {**patients(names, 2), **rows} if "not images" in message else rows
    csv = groups_csv(tmp_path / "groups.csv", full, header)
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "data", tmp_path / "split", val=0.25, test=0.25, seed=0, groups_file=csv)
    assert nothing_written(tmp_path, tmp_path / "split")
    clash = groups_csv(tmp_path / "clash.csv", patients(names, 2))
    clash.write_text(clash.read_text() + "Im001_1.tif,other\n")
    with pytest.raises(DataError, match="listed with two groups"):
        prepare(tmp_path / "data", tmp_path / "s", val=0.25, test=0.25, seed=0, groups_file=clash)


def test_groups_file_errors_are_one_line_in_the_cli(tmp_path: Path) -> None:
    names = allidb(4)
    write_images(tmp_path / "data", names)
    csv = groups_csv(tmp_path / "groups.csv", dict(list(patients(names).items())[:5]))
    result = train("prepare", tmp_path / "data", "--out", tmp_path / "split", "--groups", csv)
    assert_one_line_error(result, "gives no group for 3 images (e.g. Im006_0.tif")
    assert not (tmp_path / "split").exists()


def test_idb1_and_idb2_files_of_one_number_are_not_one_source(tmp_path: Path) -> None:
    """The two ALL-IDB sets are numbered independently: Im001_1.jpg is not Im001_1.tif."""
    data = tmp_path / "data"
    write_smears(data, allidb(6, ".jpg"), seed=1)
    write_smears(data, allidb(6, ".tif"), seed=2)
    split = prepare(data, tmp_path / "split", val=0.2, test=0.2, seed=0)
    groups = {e.path: e.group for n in ("train", "val", "test") for e in split.entries(n)}
    assert groups["Im001_1.jpg"] != groups["Im001_1.tif"]
    assert len(set(groups.values())) == 24
    assert split.near_duplicates == []  # 24 distinct smears: no false alarm


def test_near_duplicates_across_splits_warn_and_strict_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With --allow-near-duplicates (the behaviour before merging): warned, or refused."""
    data = tmp_path / "data"
    names = allidb(8)
    write_smears(data, names)
    # an "augmented copy" saved under a new name: flipped, turned, brighter, JPEG
    original = cv2.imread(str(data / "Im003_1.tif"))
    assert original is not None
    rgb = cv2.cvtColor(original, cv2.COLOR_BGR2RGB)
    copy = np.clip(np.rot90(rgb[:, ::-1]).astype(int) + 12, 0, 255).astype(np.uint8)
    cv2.imwrite(str(data / "Im103_1.jpg"), cv2.cvtColor(copy, cv2.COLOR_RGB2BGR))
    found = None
    for seed in range(20):  # a seed that puts the two in different splits
        with caplog.at_level(logging.WARNING):
            split = prepare(
                data,
                tmp_path / f"s{seed}",
                val=0.2,
                test=0.2,
                seed=seed,
                allow_near_duplicates=True,
            )
        if split.near_duplicates:
            found = seed
            break
        where = {e.path: n for n in ("train", "val", "test") for e in split.entries(n)}
        assert where["Im003_1.tif"] == where["Im103_1.jpg"]  # same split: nothing to say
    assert found is not None
    pair = split.near_duplicates[0]
    assert {pair.a, pair.b} == {"Im003_1.tif", "Im103_1.jpg"} and pair.distance <= 8
    assert "near-duplicate images in different splits" in caplog.text
    with pytest.raises(DataError, match="1 near-duplicate pairs straddle splits"):
        prepare(
            data,
            tmp_path / "strict",
            val=0.2,
            test=0.2,
            seed=found,
            strict=True,
            allow_near_duplicates=True,
        )
    assert nothing_written(tmp_path, tmp_path / "strict")

    # by default the pair is one group, so no seed can split it (issue 18, point 4)
    merged = prepare(data, tmp_path / "merged", val=0.2, test=0.2, seed=found)
    assert merged.near_duplicates == []
    assert [(m.a, m.b, m.by) for m in merged.merged] == [("Im003_1.tif", "Im103_1.jpg", "phash")]
    where = {e.path: n for n in ("train", "val", "test") for e in merged.entries(n)}
    assert where["Im003_1.tif"] == where["Im103_1.jpg"]
    group = {e.path: e.group for n in ("train", "val", "test") for e in merged.entries(n)}
    assert group["Im003_1.tif"] == group["Im103_1.jpg"]
    assert merged.leakage_check == "perceptual hash"


def test_synthetic_split_has_no_false_near_duplicates(split_dir: Path) -> None:
    assert load_split(split_dir).near_duplicates == []


def test_grouped_stratified_folds(tmp_path: Path) -> None:
    names = allidb(20)
    write_images(tmp_path / "data", names)
    groups = patients(names, 2)
    csv = groups_csv(tmp_path / "g.csv", groups)
    split = prepare(
        tmp_path / "data", tmp_path / "split", val=0.0, test=0.2, seed=2, folds=3, groups_file=csv
    )
    assert split.folds == 3 and split.entries("val") == []
    pool = split.entries("train")
    assert all(e.fold in (0, 1, 2) for e in pool)
    fold_of: dict[str, set[int | None]] = {}
    for e in pool:
        fold_of.setdefault(groups[e.path], set()).add(e.fold)
    assert all(len(f) == 1 for f in fold_of.values())  # a group is in one fold
    views = [split.for_fold(i) for i in range(3)]
    assert sorted(e.path for v in views for e in v.entries("val")) == sorted(e.path for e in pool)
    for v in views:
        assert {e.label for e in v.entries("val")} == {0, 1}
        assert not {e.path for e in v.entries("val")} & {e.path for e in v.entries("train")}
        assert v.fingerprints["test"] == split.fingerprints["test"]
    assert views[0].fingerprints["val"] != views[1].fingerprints["val"]
    with pytest.raises(DataError, match=r"pass --fold 0\.\.2"):
        split.for_fold(None)
    with pytest.raises(DataError, match="out of range"):
        split.for_fold(3)
    for kwargs, message in (
        ({"folds": 1}, "--folds must be 0"),
        ({"folds": 3, "val": 0.2}, "--folds replaces the validation split"),
        ({"folds": 20}, "too few groups for 20 folds"),
    ):
        args = {"val": 0.0, "test": 0.2, "seed": 0, **kwargs}
        with pytest.raises(DataError, match=message):
            prepare(tmp_path / "data", tmp_path / "bad", groups_file=csv, **args)  # type: ignore[arg-type]
        assert nothing_written(tmp_path, tmp_path / "bad")
