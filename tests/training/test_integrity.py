"""Split integrity (issue 18, point 6): split.json is not taken on trust, and synthetic
images stay synthetic wherever they are copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cellwatch.training.dataset import fingerprint
from cellwatch.training.errors import DataError, RunError
from cellwatch.training.layout import SYNTHETIC_MARKER, SYNTHETIC_TAG
from cellwatch.training.runinfo import RUN_FILE, load_run, load_run_split
from cellwatch.training.split import SplitFile, load_split, prepare
from cellwatch.training.synth import write_dataset


def move_first_train_image_to_test(split_json: Path, *, fix_fingerprints: bool) -> None:
    data = json.loads(split_json.read_text())
    moved = data["splits"]["train"].pop(0)
    data["splits"]["test"].append(moved)
    if fix_fingerprints:  # a careful hand: the stored fingerprints agree with the edit
        split = SplitFile.model_validate(data)
        for name in ("train", "val", "test"):
            data["fingerprints"][name] = fingerprint(split.entries(name))
    split_json.write_text(json.dumps(data))


def test_a_hand_edited_split_is_refused(split_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "split"
    shutil.copytree(split_dir, copy, ignore=shutil.ignore_patterns("bottlenecks"))
    move_first_train_image_to_test(copy / "split.json", fix_fingerprints=False)
    with pytest.raises(DataError, match="was changed after `prepare`: the train, test fingerprint"):
        load_split(copy)


def test_a_run_refuses_a_consistently_edited_split(
    trained_run: Path, split_dir: Path, tmp_path: Path
) -> None:
    """The first review moved a training image into test by hand and export accepted it."""
    split_copy, run_copy = tmp_path / "split", tmp_path / "run"
    shutil.copytree(split_dir, split_copy, ignore=shutil.ignore_patterns("bottlenecks"))
    shutil.copytree(trained_run, run_copy)
    info = json.loads((run_copy / RUN_FILE).read_text())
    info["split_dir"] = str(split_copy)
    (run_copy / RUN_FILE).write_text(json.dumps(info))
    load_run_split(run_copy, load_run(run_copy))  # as trained: accepted
    move_first_train_image_to_test(split_copy / "split.json", fix_fingerprints=True)
    with pytest.raises(RunError, match="changed after `fit`"):
        load_run_split(run_copy, load_run(run_copy))


def test_a_replaced_image_is_refused(trained_run: Path, split_dir: Path, tmp_path: Path) -> None:
    split_copy, run_copy, data = tmp_path / "split", tmp_path / "run", tmp_path / "data"
    split = load_split(split_dir)
    shutil.copytree(split.root, data)
    shutil.copytree(split_dir, split_copy, ignore=shutil.ignore_patterns("bottlenecks"))
    shutil.copytree(trained_run, run_copy)
    doc = json.loads((split_copy / "split.json").read_text())
    doc["data_root"] = str(data)
    (split_copy / "split.json").write_text(json.dumps(doc))
    info = json.loads((run_copy / RUN_FILE).read_text())
    info["split_dir"], info["data_root"] = str(split_copy), str(data)
    (run_copy / RUN_FILE).write_text(json.dumps(info))
    victim = split.entries("test")[0].path
    (data / victim).write_bytes((data / split.entries("test")[1].path).read_bytes())
    with pytest.raises(DataError, match=f"{victim} changed since `prepare`"):
        load_run_split(run_copy, load_run(run_copy))


def test_synthetic_images_are_flagged_wherever_they_go(tmp_path: Path) -> None:
    write_dataset(tmp_path / "synth", 12, seed=4)
    write_dataset(tmp_path / "synth-jpg", 4, seed=5, image_format="jpg")
    for f in [*(tmp_path / "synth").iterdir(), *(tmp_path / "synth-jpg").iterdir()]:
        if f.name != SYNTHETIC_MARKER:
            assert SYNTHETIC_TAG in f.read_bytes(), f.name
    # copied into an ALL-IDB2 download's layout, without the folder's marker file
    real = tmp_path / "ALL_IDB2" / "img"
    real.mkdir(parents=True)
    for f in (tmp_path / "synth").glob("*.tif"):
        shutil.copy(f, real / f.name)
    split = prepare(tmp_path / "ALL_IDB2", tmp_path / "split", val=0.2, test=0.2, seed=1)
    assert split.synthetic is True
    # the marker file alone still counts; real images carry no tag
    assert not (real / SYNTHETIC_MARKER).exists()
