"""`prepare`: layouts, a stratified split by source image, fingerprints, and bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from cellwatch.training.dataset import fingerprint, load_rgb
from cellwatch.training.errors import DataError, TrainingError
from cellwatch.training.split import SPLIT_FILE, load_split, prepare
from tests.images import truncated_jpeg
from tests.training.helpers import allidb, nothing_written, write_images


def test_allidb2_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    write_images(tmp_path / "data", allidb(20))
    split = prepare(tmp_path / "data", tmp_path / "split", val=0.15, test=0.15, seed=1)
    assert split.layout == "ALL-IDB2" and not split.synthetic
    assert split.class_counts("train") == {"normal": 14, "ALL": 14}
    assert split.class_counts("val") == split.class_counts("test") == {"normal": 3, "ALL": 3}
    paths = [{e.path for e in split.entries(s)} for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert load_split(tmp_path / "split") == split
    again = prepare(tmp_path / "data", tmp_path / "split2", val=0.15, test=0.15, seed=1)
    other = prepare(tmp_path / "data", tmp_path / "split3", val=0.15, test=0.15, seed=2)
    assert again.splits == split.splits and again.fingerprints == split.fingerprints
    assert other.splits != split.splits and other.fingerprints["all"] == split.fingerprints["all"]


def test_copies_of_one_source_image_stay_in_one_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_images(data, allidb(12, ".jpg"))
    for i in range(1, 25):  # the same source image again as TIFF (same name stem)
        shutil.copy(data / f"Im{i:03d}_{i % 2}.jpg", data / f"Im{i:03d}_{i % 2}.tif")
    shutil.copy(data / "Im003_1.jpg", data / "Im101_1.jpg")  # identical bytes, other name
    split = prepare(data, tmp_path / "split", val=0.2, test=0.2, seed=0)
    assert split.layout == "ALL-IDB"
    where = {e.path: name for name in ("train", "val", "test") for e in split.entries(name)}
    for i in range(1, 25):
        assert where[f"Im{i:03d}_{i % 2}.jpg"] == where[f"Im{i:03d}_{i % 2}.tif"]
    assert where["Im003_1.jpg"] == where["Im101_1.jpg"]


def test_allidb1_download_layout_and_class_folders(tmp_path: Path) -> None:
    idb1 = tmp_path / "ALL_IDB1"
    write_images(idb1 / "im", allidb(4, ".jpg"))
    (idb1 / "xyc").mkdir()
    (idb1 / "xyc" / "Im001_1.xyc").write_text("10 20\n")
    assert prepare(idb1, tmp_path / "s1", val=0.25, test=0.25, seed=0).layout == "ALL-IDB1"

    folders = tmp_path / "folders"
    write_images(folders / "ALL", [f"cell{i}.png" for i in range(4)], seed=1)
    write_images(folders / "hem", [f"cell{i}.bmp" for i in range(4)], seed=2)
    split = prepare(folders, tmp_path / "s2", val=0.25, test=0.25, seed=0)
    assert split.layout == "class-folders"
    assert {e.path.split("/")[0]: e.label for e in split.entries("train")} == {"ALL": 1, "hem": 0}


def test_fingerprint_ignores_names_and_order(tmp_path: Path) -> None:
    write_images(tmp_path / "a", allidb(3))
    split = prepare(tmp_path / "a", tmp_path / "s", val=0.0, test=0.0, seed=0)
    entries = split.entries("train")
    renamed = [e.model_copy(update={"path": f"x/{e.path}"}) for e in reversed(entries)]
    assert fingerprint(renamed) == fingerprint(entries) == split.fingerprints["all"]
    flipped = [e.model_copy(update={"label": 1 - e.label}) for e in entries]
    assert fingerprint(flipped) != fingerprint(entries)


def test_corrupt_images_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    write_images(data, allidb(6, ".jpg"))
    (data / "Im050_1.jpg").write_bytes(truncated_jpeg())
    (data / "Im051_0.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    with caplog.at_level(logging.WARNING):
        split = prepare(data, tmp_path / "split", val=0.2, test=0.2, seed=0)
    assert sorted(s.path for s in split.skipped) == ["Im050_1.jpg", "Im051_0.jpg"]
    assert sum(len(split.entries(n)) for n in ("train", "val", "test")) == 12
    assert "2 of 14 images could not be decoded" in caplog.text


def test_changed_image_is_detected(tmp_path: Path) -> None:
    write_images(tmp_path / "data", allidb(3))
    split = prepare(tmp_path / "data", tmp_path / "split", val=0.0, test=0.0, seed=0)
    entry = split.entries("train")[0]
    assert load_rgb(split.root, entry).shape == (48, 64, 3)
    write_images(tmp_path / "data", [entry.path], seed=99)
    with pytest.raises(DataError, match="changed since `prepare`"):
        load_rgb(split.root, entry)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "is empty"),
        (["Im001_1.tif", "Im002_1.tif", "Im003_1.tif"], "one class only"),
        (["Im001_1.tif", "Im002_0.tif", "photo.jpg"], "fit no known layout"),
        (["Im001_1.tif", "Im002_0.tif", "Im003_1.tif", "Im004_0.tif"], "split too small"),
    ],
)
def test_bad_folders_are_refused_and_nothing_is_written(
    tmp_path: Path, names: list[str], message: str
) -> None:
    write_images(tmp_path / "data", names)
    (tmp_path / "data").mkdir(exist_ok=True)
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "data", tmp_path / "split", val=0.15, test=0.15, seed=0)
    assert nothing_written(tmp_path, tmp_path / "split")


def test_unknown_class_folder_and_bad_fractions(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ALL", ["a.png"])
    write_images(tmp_path / "data" / "monocytes", ["b.png"])
    with pytest.raises(DataError, match="monocytes is not a class name"):
        prepare(tmp_path / "data", tmp_path / "split", val=0.1, test=0.1, seed=0)
    write_images(tmp_path / "flat", allidb(10))
    with pytest.raises(DataError, match="sum to less than 1"):
        prepare(tmp_path / "flat", tmp_path / "split", val=0.5, test=0.5, seed=0)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nowhere", tmp_path / "split", val=0.1, test=0.1, seed=0)
    assert nothing_written(tmp_path, tmp_path / "split")


def test_existing_split_needs_force(tmp_path: Path) -> None:
    write_images(tmp_path / "data", allidb(3))
    prepare(tmp_path / "data", tmp_path / "split", val=0.0, test=0.0, seed=0)
    with pytest.raises(TrainingError, match="already exists"):
        prepare(tmp_path / "data", tmp_path / "split", val=0.0, test=0.0, seed=0)
    prepare(tmp_path / "data", tmp_path / "split", val=0.0, test=0.0, seed=1, force=True)
    assert (tmp_path / "split" / SPLIT_FILE).is_file()
