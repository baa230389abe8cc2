"""`evaluate`: the metrics, their files, and their tie to the evaluated images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cellwatch.training.errors import RunError
from cellwatch.training.evaluate import METRICS_FILE, Metrics, compute, eval_dir, evaluate
from cellwatch.training.runinfo import load_run
from cellwatch.training.split import load_split


def test_metric_definitions() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.4, 0.9, 0.8, 0.6, 0.3, 0.55, 0.2])
    m = compute(y, p)  # TN 3, FP 1, FN 2, TP 4
    assert m["confusion"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert m["roc_auc"] == pytest.approx(17.5 / 24)  # pairs ranked right, ties half
    assert compute(np.array([1, 1]), np.array([0.2, 0.9]))["roc_auc"] is None


@pytest.mark.slow
def test_evaluate_writes_metrics_tied_to_the_split(trained_run: Path, split_dir: Path) -> None:
    metrics = evaluate(trained_run, "test")
    out = eval_dir(trained_run, "test")
    assert Metrics.model_validate_json((out / METRICS_FILE).read_bytes()) == metrics
    split = load_split(split_dir)
    assert metrics.n == 6 and metrics.fingerprint == split.fingerprints["test"]
    assert metrics.synthetic and metrics.checkpoint == load_run(trained_run).checkpoint
    assert sum(map(sum, metrics.confusion)) == 6
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [e.path for e in split.entries("test")]
    y = np.array([r["label"] == "ALL" for r in rows], dtype=np.int64)
    p = np.array([float(r["p_ALL"]) for r in rows])
    assert compute(y, p)["accuracy"] == pytest.approx(metrics.accuracy)
    for png in ("confusion.png", "roc.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="not a training run"):
        evaluate(tmp_path)
