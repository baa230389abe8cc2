"""`evaluate`: the TensorFlow model of a run on one split (test by default), with intervals.

Positive class is ALL (index 1): sensitivity = TP / (TP + FN), specificity = TN / (TN
+ FP), at the argmax threshold 0.5 (the calibrated threshold is chosen and applied by
`export`, whose manifest carries the deployed model's own figures). With `prepare
--groups` the ROC AUC's bootstrap resamples patients/smears, and `units` gives the
figures per patient/smear. Every proportion
has its Wilson 95% interval and counts, ROC AUC a bootstrap interval (stats.py).
Writes RUN/eval-<split>/ with metrics.json, predictions.csv, confusion.png and
roc.png; metrics.json carries the split's fingerprint so the numbers can be traced
to the exact images. The run must still match its split (runinfo.load_run_split),
and every evaluation of the test split is counted in run.json.

Several runs that are folds of one K-fold split (`fit --fold i`) are evaluated each
on its own held-out fold, and `cross_validate` gives the mean and standard deviation
over the folds.
"""

from __future__ import annotations

import csv
import logging
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationError
from sklearn.metrics import roc_curve

from cellwatch.shared.figures import UnitFigures
from cellwatch.training import LABELS, plots
from cellwatch.training.dataset import ImageEntry, load_rgb
from cellwatch.training.errors import DataError, RunError
from cellwatch.training.evalgraph import EvalGraph
from cellwatch.training.outdir import staged_dir
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.progress import track
from cellwatch.training.runinfo import (
    RunInfo,
    load_run,
    load_run_split,
    record_test_read,
    write_json,
)
from cellwatch.training.stats import MetricSet, fmt, metric_set, unit_figures
from cellwatch.training.stratify import SplitName

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
BATCH = 8
SUMMARY_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "roc_auc")


class Metrics(MetricSet):
    """metrics.json: the figures (MetricSet) and what they are of."""

    split: SplitName
    positive_label: str = LABELS[1]
    labels: list[str]
    fingerprint: str = Field(description="the evaluated split's data fingerprint")
    checkpoint: str
    fold: int | None = None
    synthetic: bool
    test_reads: int = Field(0, ge=0, description="reads of the test split by this run so far")
    units: UnitFigures | None = Field(
        None, description="patient/smear-level figures (prepare --groups); null without groups"
    )
    created_at: datetime


def eval_dir(run: Path, split: SplitName) -> Path:
    return run / f"eval-{split}"


def batches(
    root: Path, entries: Sequence[ImageEntry], pre: Preprocessor, what: str
) -> Iterator[np.ndarray]:
    """Eval-preprocessed inputs [<=BATCH, 299, 299, 3], in entry order."""
    starts = range(0, len(entries), BATCH)
    for start in track(starts, what, total=len(starts)):
        yield np.stack([pre.eval(load_rgb(root, e)) for e in entries[start : start + BATCH]])


def evaluate(run: Path, split_name: SplitName = "test") -> Metrics:
    """Evaluate the run's checkpoint on split_name and write RUN/eval-<split>/."""
    info = load_run(run)
    split = load_run_split(run, info)
    entries = split.entries(split_name)
    if not entries:
        raise DataError(f"the {split_name} split of {info.split_dir} is empty")
    probs = predict(run, info, entries, f"evaluating ({split_name})")
    info = record_test_read(run, "evaluate", split_name, len(entries))
    y_true = np.array([e.label for e in entries], np.int64)
    groups = [e.group for e in entries] if split.grouping == "groups-file" else None
    units = None
    if groups is not None:
        count, unit_set = unit_figures(y_true, probs[:, 1], groups, 0.5)
        units = UnitFigures(units=count, metrics=unit_set)
    metrics = Metrics.model_validate(
        {
            **metric_set(y_true, probs[:, 1], groups=groups).model_dump(),
            "units": units,
            "split": split_name,
            "labels": list(LABELS),
            "fingerprint": split.fingerprints[split_name],
            "checkpoint": info.checkpoint,
            "fold": info.config.fold,
            "synthetic": info.synthetic,
            "test_reads": len(info.test_reads),
            "created_at": datetime.now(UTC),
        }
    )
    title = f"{split_name} split, n={len(entries)}"
    with staged_dir(
        eval_dir(run, split_name), marker=METRICS_FILE, force=True, what="evaluation"
    ) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        _write_predictions(tmp / "predictions.csv", entries, probs)
        plots.confusion(
            np.array(metrics.confusion),
            LABELS,
            tmp / "confusion.png",
            title=f"{title}\naccuracy {fmt(metrics.accuracy)}",
            synthetic=info.synthetic,
        )
        both = metrics.roc_auc.value is not None
        fpr, tpr, _ = roc_curve(y_true, probs[:, 1]) if both else (np.zeros(1), np.zeros(1), None)
        plots.roc(fpr, tpr, metrics.roc_auc, tmp / "roc.png", title=title, synthetic=info.synthetic)
    log.info(
        "%s%s: accuracy %s, sensitivity %s, specificity %s, ROC AUC %s",
        split_name,
        " (SYNTHETIC data)" if info.synthetic else "",
        fmt(metrics.accuracy),
        fmt(metrics.sensitivity),
        fmt(metrics.specificity),
        fmt(metrics.roc_auc),
    )
    return metrics


def predict(run: Path, info: RunInfo, entries: Sequence[ImageEntry], what: str) -> np.ndarray:
    """[N, classes] probabilities of the run's checkpoint on entries (TensorFlow eval graph)."""
    return np.asarray(_run_graph(run, info, entries, what, logits=False))


def predict_logits(
    run: Path, info: RunInfo, entries: Sequence[ImageEntry], what: str
) -> np.ndarray:
    """[N, classes] pre-softmax logits of the run's checkpoint on entries."""
    return np.asarray(_run_graph(run, info, entries, what, logits=True))


def _run_graph(
    run: Path, info: RunInfo, entries: Sequence[ImageEntry], what: str, *, logits: bool
) -> np.ndarray:
    root = Path(info.data_root)
    out = []
    depth = info.config.depth_multiplier
    with EvalGraph(run / info.checkpoint, depth_multiplier=depth) as graph, Preprocessor() as pre:
        for x in batches(root, entries, pre, what):
            out.append(graph.predict_logits(x) if logits else graph.predict(x))
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)


def load_metrics(run: Path, split: SplitName) -> Metrics | None:
    path = eval_dir(run, split) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return Metrics.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise RunError(f"{path} is not a valid metrics file: {exc.errors()[0]['msg']}") from exc


@dataclass(frozen=True)
class FoldSummary:
    """Mean and sample standard deviation of each figure over cross-validation folds."""

    folds: list[int]
    total_folds: int
    mean: dict[str, float | None]
    sd: dict[str, float | None]
    per_fold: list[Metrics]


def cross_validate(runs: Sequence[Path], split_name: SplitName = "val") -> FoldSummary:
    """Evaluate fold runs of one split, each on its own split_name (default: its held-out
    fold), and summarise over folds."""
    infos = [load_run(r) for r in runs]
    folds = [i.config.fold for i in infos]
    if any(f is None for f in folds):
        bad = next(r for r, f in zip(runs, folds, strict=True) if f is None)
        raise RunError(f"{bad} is not a cross-validation run (fit it with --fold)")
    if len({i.fingerprints.get("all") for i in infos}) > 1 or len({i.split_dir for i in infos}) > 1:
        raise RunError("these runs come from different splits: folds must share one split")
    if len(set(folds)) != len(folds):
        raise RunError(
            f"two runs of the same fold among {sorted(f for f in folds if f is not None)}"
        )
    per_fold = [evaluate(r, split_name) for r in runs]
    mean: dict[str, float | None] = {}
    sd: dict[str, float | None] = {}
    for name in SUMMARY_METRICS:
        values = [getattr(m, name).value for m in per_fold]
        known = [v for v in values if v is not None]
        mean[name] = statistics.fmean(known) if known else None
        sd[name] = statistics.stdev(known) if len(known) > 1 else None
    total = load_run_split(runs[0], infos[0]).folds
    return FoldSummary(
        folds=[f for f in folds if f is not None],
        total_folds=total,
        mean=mean,
        sd=sd,
        per_fold=per_fold,
    )


def _write_predictions(path: Path, entries: Sequence[ImageEntry], probs: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *(f"p_{name}" for name in LABELS), "predicted"])
        for e, p in zip(entries, probs, strict=True):
            writer.writerow(
                [e.path, LABELS[e.label], *(f"{v:.6f}" for v in p), LABELS[int(np.argmax(p))]]
            )
