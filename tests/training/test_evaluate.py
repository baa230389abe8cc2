"""`evaluate`: the metrics with their intervals, their files, their tie to the evaluated
images, and the run's tie to its split."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellwatch.training.errors import RunError
from cellwatch.training.evaluate import METRICS_FILE, Metrics, eval_dir, evaluate
from cellwatch.training.export import ExportOptions, export
from cellwatch.training.runinfo import RUN_FILE, load_run
from cellwatch.training.split import load_split, prepare
from cellwatch.training.stats import metric_set


@pytest.mark.slow
def test_evaluate_writes_metrics_tied_to_the_split(trained_run: Path, split_dir: Path) -> None:
    before = len(load_run(trained_run).test_reads)
    metrics = evaluate(trained_run, "test")
    out = eval_dir(trained_run, "test")
    assert Metrics.model_validate_json((out / METRICS_FILE).read_bytes()) == metrics
    split = load_split(split_dir)
    assert metrics.n == 6 and metrics.fingerprint == split.fingerprints["test"]
    assert metrics.synthetic and metrics.checkpoint == load_run(trained_run).checkpoint
    assert sum(map(sum, metrics.confusion)) == 6
    for est in (metrics.accuracy, metrics.sensitivity, metrics.specificity):
        assert est.value is not None and est.ci95 is not None
        assert est.ci95[0] <= est.value <= est.ci95[1] and est.n in (3, 6)
    saved = json.loads((out / METRICS_FILE).read_text())
    assert len(saved["accuracy"]["ci95"]) == 2 and saved["roc_auc"]["resamples"] == 2000
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [e.path for e in split.entries("test")]
    y = np.array([r["label"] == "ALL" for r in rows], dtype=np.int64)
    p = np.array([float(r["p_ALL"]) for r in rows])
    assert metric_set(y, p).accuracy.k == metrics.accuracy.k
    for png in ("confusion.png", "roc.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # every look at the test split is counted; the validation split is not
    evaluate(trained_run, "val")
    reads = load_run(trained_run).test_reads
    assert len(reads) == before + 1 == metrics.test_reads
    assert reads[-1].command == "evaluate" and reads[-1].n == 6


@pytest.mark.slow
def test_a_split_changed_after_fit_is_refused(
    trained_run: Path, split_dir: Path, signing_key: Path, tmp_path: Path
) -> None:
    """`prepare --force` with another seed after `fit`: the new test split holds images
    the run trained on, so neither evaluate nor export may use it."""
    split = load_split(split_dir)
    moved = tmp_path / "split"
    prepare(Path(split.data_root), moved, val=0.15, test=0.15, seed=99)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    info = json.loads((run / RUN_FILE).read_text())
    (run / RUN_FILE).write_text(json.dumps({**info, "split_dir": str(moved)}))
    with pytest.raises(RunError, match="changed after `fit`"):
        evaluate(run, "test")
    with pytest.raises(RunError, match="changed after `fit`"):
        export(
            run,
            tmp_path / "bundle",
            ExportOptions(name="x", version="1", precision="fp16", sign_key=signing_key),
        )
    assert not (tmp_path / "bundle").exists()
    assert len(load_run(run).test_reads) == len(info["test_reads"])  # nothing was read


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="not a training run"):
        evaluate(tmp_path)
