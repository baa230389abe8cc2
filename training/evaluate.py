"""`evaluate`: metrics of a run's final checkpoint on one split (test by default).

Positive class is ALL (index 1): recall = sensitivity = TP / (TP + FN), specificity =
TN / (TN + FP). Writes RUN/eval-<split>/ with metrics.json, predictions.csv,
confusion.png and roc.png; metrics.json carries the split's fingerprint so a bundle's
numbers can be traced to the exact images.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cellwatch.training import LABELS, plots
from cellwatch.training.dataset import ImageEntry, load_rgb
from cellwatch.training.errors import DataError, RunError
from cellwatch.training.evalgraph import EvalGraph
from cellwatch.training.outdir import staged_dir
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.progress import track
from cellwatch.training.runinfo import RunInfo, load_run, write_json
from cellwatch.training.split import SplitName, load_split

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
BATCH = 8


class Metrics(BaseModel):
    """metrics.json (also copied into the bundle manifest's `metrics`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: SplitName
    n: int = Field(ge=0)
    positive_label: str = LABELS[1]
    accuracy: float
    precision: float
    recall: float = Field(description="sensitivity: TP / (TP + FN), ALL is positive")
    specificity: float = Field(description="TN / (TN + FP)")
    f1: float
    roc_auc: float | None = Field(description="null when the split has one class only")
    confusion: list[list[int]] = Field(description="rows true, columns predicted, label order")
    labels: list[str]
    fingerprint: str = Field(description="the evaluated split's data fingerprint")
    checkpoint: str
    synthetic: bool
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


def compute(y_true: np.ndarray, p_all: np.ndarray) -> dict[str, object]:
    """The metric values for labels y_true and probabilities of ALL p_all."""
    y_pred = (p_all >= 0.5).astype(np.int64)
    cm = confusion_matrix(y_true, y_pred, labels=[0, 1])
    tn, fp = int(cm[0, 0]), int(cm[0, 1])
    both = len(set(y_true.tolist())) == 2
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(y_true, p_all)) if both else None,
        "confusion": cm.astype(int).tolist(),
    }


def evaluate(run: Path, split_name: SplitName = "test") -> Metrics:
    """Evaluate the run's checkpoint on split_name and write RUN/eval-<split>/."""
    info = load_run(run)
    split = load_split(Path(info.split_dir))
    entries = split.entries(split_name)
    if not entries:
        raise DataError(f"the {split_name} split of {info.split_dir} is empty")
    probs = predict(run, info, entries, f"evaluating ({split_name})")
    y_true = np.array([e.label for e in entries], np.int64)
    values = compute(y_true, probs[:, 1])
    metrics = Metrics.model_validate(
        {
            **values,
            "split": split_name,
            "n": len(entries),
            "labels": list(LABELS),
            "fingerprint": split.fingerprints[split_name],
            "checkpoint": info.checkpoint,
            "synthetic": info.synthetic,
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
            title=title,
            synthetic=info.synthetic,
        )
        both = metrics.roc_auc is not None
        fpr, tpr, _ = roc_curve(y_true, probs[:, 1]) if both else (np.zeros(1), np.zeros(1), None)
        plots.roc(fpr, tpr, metrics.roc_auc, tmp / "roc.png", title=title, synthetic=info.synthetic)
    log.info(
        "%s%s: accuracy %.3f, sensitivity %.3f, specificity %.3f, F1 %.3f, AUC %s",
        split_name,
        " (SYNTHETIC data)" if info.synthetic else "",
        metrics.accuracy,
        metrics.recall,
        metrics.specificity,
        metrics.f1,
        "n/a" if metrics.roc_auc is None else f"{metrics.roc_auc:.3f}",
    )
    return metrics


def predict(run: Path, info: RunInfo, entries: Sequence[ImageEntry], what: str) -> np.ndarray:
    """[N, classes] probabilities of the run's checkpoint on entries (TensorFlow eval graph)."""
    root = Path(info.data_root)
    out = []
    with EvalGraph(run / info.checkpoint) as graph, Preprocessor() as pre:
        for x in batches(root, entries, pre, what):
            out.append(graph.predict(x))
    return np.concatenate(out)


def load_metrics(run: Path, split: SplitName) -> Metrics | None:
    path = eval_dir(run, split) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return Metrics.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise RunError(f"{path} is not a valid metrics file: {exc.errors()[0]['msg']}") from exc


def _write_predictions(path: Path, entries: Sequence[ImageEntry], probs: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *(f"p_{name}" for name in LABELS), "predicted"])
        for e, p in zip(entries, probs, strict=True):
            writer.writerow(
                [e.path, LABELS[e.label], *(f"{v:.6f}" for v in p), LABELS[int(np.argmax(p))]]
            )
