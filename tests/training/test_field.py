"""Labelled field samples through `cellwatch-train` as a user runs it (issue 20, point 4):
`prepare --field DIR` keeps a source, and a field image with its near-copy in the data
set, in one split; `evaluate RUN --field DIR` gives figures per reason with n and
intervals; every bad field directory is one clear line and writes nothing."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cellwatch.shared.samples import COLUMNS, SAMPLES_CSV, sample_file_name
from cellwatch.training.layout import allidb_label
from tests.training.helpers import assert_one_line_error, nothing_written, train, write_field
from tests.training.sizes import TEST_BASE

LABEL_NAMES = ("normal", "ALL")


def _label(image: Path) -> str:
    return LABEL_NAMES[allidb_label(image.name) or 0]


def _images(folder: Path) -> list[Path]:
    return sorted(folder.glob("Im*.tif"))


@pytest.fixture(scope="module")
def other_smears(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """SYNTHETIC smears that are not in the session's data set (another seed)."""
    from cellwatch.training.synth import write_dataset

    out = tmp_path_factory.mktemp("field-smears") / "data"
    write_dataset(out, 10, seed=77)
    return _images(out)


def _split_of(split: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    return {e["path"]: name for name, entries in split.items() for e in entries}


def test_prepare_keeps_sources_and_near_copies_in_one_split(
    synth_data: Path, other_smears: list[Path], tmp_path: Path
) -> None:
    data = _images(synth_data)
    copied = data[::4]  # 10 images; each near-copy comes from a source of its own
    ids = write_field(
        tmp_path / "field",
        [(p, _label(p), "random", f"copy-{i}") for i, p in enumerate(copied)],
        brighten=2,
    )
    lab_ids = write_field(
        tmp_path / "field-lab",
        [(p, _label(p), "low_confidence", "lab-a") for p in other_smears[:6]],
    )
    # a labeller's spreadsheet: columns reordered, a notes column added
    _edit_csv(tmp_path / "field-lab", _reorder_and_annotate)
    result = train(
        "prepare",
        synth_data,
        "--out",
        tmp_path / "split",
        "--seed",
        "3",
        "--field",
        tmp_path / "field",
        "--field",
        tmp_path / "field-lab",
    )
    assert result.returncode == 0, result.stderr
    assert "field: 16 labelled samples from 11 sources" in result.stdout
    split = json.loads((tmp_path / "split" / "split.json").read_text())
    where = _split_of(split["splits"])
    for image, sid in zip(copied, ids, strict=True):
        copy = (tmp_path / "field" / sample_file_name(sid)).resolve().as_posix()
        assert where[image.name] == where[copy], (image.name, where[image.name], where[copy])
    lab = {
        where[(tmp_path / "field-lab" / sample_file_name(s)).resolve().as_posix()] for s in lab_ids
    }
    assert len(lab) == 1, "one source's samples were dealt to several splits"
    assert len([m for m in split["merged"] if m["by"] == "phash"]) >= len(copied)
    assert [f["samples"] for f in split["field"]] == [10, 6]


def test_field_into_train_puts_the_samples_and_their_near_copies_in_training(
    synth_data: Path, other_smears: list[Path], tmp_path: Path
) -> None:
    data = _images(synth_data)
    copied = data[1::5]  # near-copies of data set images, all from one source
    ids = write_field(
        tmp_path / "field",
        [(p, _label(p), "random", "lab-a") for p in copied]
        + [(p, _label(p), "random", "lab-a") for p in other_smears[:4]],
        brighten=2,
    )
    result = train(
        "prepare",
        synth_data,
        "--out",
        tmp_path / "split",
        "--field",
        tmp_path / "field",
        "--field-into",
        "train",
    )
    assert result.returncode == 0, result.stderr
    split = json.loads((tmp_path / "split" / "split.json").read_text())
    where = _split_of(split["splits"])
    samples = [(tmp_path / "field" / sample_file_name(i)).resolve().as_posix() for i in ids]
    assert {where[s] for s in samples} == {"train"}
    assert {where[image.name] for image in copied} == {"train"}, "a near-copy left training"
    assert split["field_into"] == "train"
    assert split["splits"]["test"] and split["splits"]["val"], "the data set was still split"


def test_evaluate_field_per_reason_with_intervals(
    trained_run: Path, synth_data: Path, other_smears: list[Path], tmp_path: Path
) -> None:
    reasons = ["random"] * 6 + ["low_confidence"] * 4
    samples = [
        (p, _label(p), reason, "lab-a" if i % 2 else "lab-b")
        for i, (p, reason) in enumerate(zip(other_smears, reasons, strict=True))
    ]
    seen = json.loads(
        (
            Path(json.loads((trained_run / "run.json").read_text())["split_dir"]) / "split.json"
        ).read_text()
    )
    trained_on = synth_data / seen["splits"]["train"][0]["path"]
    samples.append((trained_on, _label(trained_on), "random", "lab-c"))  # the run has seen it
    write_field(tmp_path / "field", samples)
    result = train("evaluate", trained_run, "--field", tmp_path / "field")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "field samples (n=10" in out
    assert "random (unbiased): n=6 (2 sources" in out
    assert "low_confidence (hard): n=4 (2 sources" in out
    assert "disagreement (hard): n=0, no samples, no figures" in out
    assert "all (together): n=10 (2 sources" in out
    assert len(re.findall(r"accuracy +\d\.\d\d \(95% CI \d\.\d\d-\d\.\d\d, \d+/6\)", out)) == 1
    assert len(re.findall(r"accuracy +\d\.\d\d \(95% CI \d\.\d\d-\d\.\d\d, \d+/4\)", out)) == 1
    assert "only `random` samples give an unbiased estimate of field accuracy" in out
    assert "left out 1 samples" in out
    evaluation = json.loads((trained_run / "eval-field" / "field.json").read_text())
    with (trained_run / "eval-field" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    for reason in ("random", "low_confidence"):
        mine = [r for r in rows if r["reason"] == reason]
        right = sum((float(r["p_ALL"]) >= 0.5) == (r["label"] == "ALL") for r in mine)
        accuracy = evaluation["per_reason"][reason]["metrics"]["accuracy"]
        assert (accuracy["k"], accuracy["n"]) == (right, len(mine))
        lo, hi = accuracy["ci95"]
        assert lo <= accuracy["value"] <= hi
    assert evaluation["per_reason"]["disagreement"] == {
        **evaluation["per_reason"]["disagreement"],
        "n": 0,
        "metrics": None,
    }


def _edit_csv(folder: Path, change: Callable[[list[list[str]]], None]) -> None:
    path = folder / SAMPLES_CSV
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    change(rows)
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _reorder_and_annotate(rows: list[list[str]]) -> None:
    rows[:] = [["notes" if i == 0 else "looked twice", *reversed(r)] for i, r in enumerate(rows)]


def _set_label(rows: list[list[str]], line: int, label: str) -> None:
    rows[line - 1][rows[0].index("label")] = label


def _drop_image(folder: Path) -> None:
    with (folder / SAMPLES_CSV).open() as f:
        first = next(csv.DictReader(f))["id"]
    (folder / sample_file_name(first)).unlink()


def _change_image(folder: Path) -> None:
    with (folder / SAMPLES_CSV).open() as f:
        first = next(csv.DictReader(f))["id"]
    path = folder / sample_file_name(first)
    path.write_bytes(path.read_bytes() + b"\0")


def _make_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("x")


BAD_FIELDS: list[tuple[str, Callable[[Path], object], str]] = [
    (
        "unknown label",
        lambda d: _edit_csv(d, lambda r: _set_label(r, 3, "blast")),
        "line 3: unknown label 'blast' (known: normal, ALL)",
    ),
    ("missing label", lambda d: _edit_csv(d, lambda r: _set_label(r, 2, "")), "line 2: no label"),
    ("duplicate id", lambda d: _edit_csv(d, lambda r: r.append(list(r[1]))), "repeats line 2"),
    ("row without image", _drop_image, "line 2: no image file"),
    (
        "image without row",
        lambda d: (d / sample_file_name("0" * 64)).write_bytes(b"png"),
        f"{sample_file_name('0' * 64)}: image without a row",
    ),
    ("changed image", _change_image, "is not the exported file (its SHA-256 differs)"),
    ("empty CSV", lambda d: (d / SAMPLES_CSV).write_text(""), "samples.csv: 1 problem: empty"),
    (
        "header only",
        lambda d: (d / SAMPLES_CSV).write_text(",".join(COLUMNS) + "\n"),
        "no rows (only a header)",
    ),
    ("not a directory", _make_file, "not a directory"),
]


@pytest.mark.parametrize(("case", "spoil", "fragment"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_prepare_refuses_bad_field_directories(
    synth_data: Path, tmp_path: Path, case: str, spoil: Callable[[Path], object], fragment: str
) -> None:
    images = _images(synth_data)[:3]
    write_field(tmp_path / "field", [(p, _label(p), "random", "lab-a") for p in images])
    spoil(tmp_path / "field")
    result = train(
        "prepare", synth_data, "--out", tmp_path / "split", "--field", tmp_path / "field"
    )
    assert_one_line_error(result, fragment)
    assert nothing_written(tmp_path, tmp_path / "split")


def test_evaluate_refuses_unlabelled_samples_and_writes_nothing(
    trained_run: Path, other_smears: list[Path], tmp_path: Path
) -> None:
    write_field(
        tmp_path / "field",
        [(p, _label(p), "random", "lab-a") for p in other_smears[:3]],
        labelled=False,
    )
    before = _files(trained_run)
    result = train("evaluate", trained_run, "--field", tmp_path / "field")
    assert_one_line_error(result, "3 problems: line 2: no label (label it normal or ALL)")
    assert _files(trained_run) == before


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_export_field_puts_the_deployed_figures_in_manifest_and_card(
    trained_run: Path, signing_key: Path, other_smears: list[Path], tmp_path: Path
) -> None:
    from cellwatch.shared.bundle import load_bundle
    from cellwatch.shared.samples import SampleReason
    from cellwatch.shared.signing import TrustedKeys

    reasons = ["random"] * 3 + ["disagreement"] * 2
    write_field(
        tmp_path / "field",
        [(p, _label(p), r, "lab-a") for p, r in zip(other_smears, reasons, strict=False)],
    )
    result = train(
        *("export", trained_run, "--out", tmp_path / "b", "--name", "x", "--version", "1"),
        *("--precision", "fp32", "--sign-key", signing_key, "--calibration-size", "4"),
        *("--base-is", TEST_BASE, "--allow-no-skill", "--allow-degraded"),
        *("--field", tmp_path / "field"),
    )
    assert result.returncode == 0, result.stderr
    assert "field samples (n=5" in result.stdout and "random (unbiased): n=3" in result.stdout
    keys = TrustedKeys.load(signing_key.parent)
    figures = load_bundle(tmp_path / "b", keys).manifest.figures
    assert figures is not None and figures.field is not None
    field = figures.field
    assert field.model.startswith("deployed fp32 IR")
    assert field.threshold == figures.deployed.metrics.threshold  # the bundle's own decision
    counts = {r: field.per_reason[r].n for r in SampleReason}
    assert counts == {"random": 3, "disagreement": 2, "low_confidence": 0}
    assert field.per_reason[SampleReason.LOW_CONFIDENCE].metrics is None
    assert (
        field.all.first is not None and field.all.first.isoformat() == "2026-11-02T09:00:00+00:00"
    )
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "## Field evaluation (labelled field samples, n = 5)" in card
    assert "| random | 3 | 1 | 2026-11-02 to 2026-11-02 |" in card
    assert "| low_confidence | 0 | 0 | - | no samples |" in card
    assert "Only `random` samples give an unbiased estimate" in card
    assert "External validation is limited to 5 labelled field samples (3 `random`" in card
