"""PNG figures: training curves, confusion matrix, ROC curve, reliability diagram
(matplotlib, no GUI backend). Figures state n and their 95% intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cellwatch.training.calibration import Reliability
from cellwatch.training.runinfo import EpochLog
from cellwatch.training.stats import Auc, fmt

SYNTHETIC_NOTE = "SYNTHETIC data"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def _title(text: str, synthetic: bool) -> str:
    return f"{text} ({SYNTHETIC_NOTE})" if synthetic else text


def training_curves(
    history: Sequence[EpochLog], path: Path, *, synthetic: bool, selected: int | None = None
) -> None:
    """Loss and accuracy per epoch, training and validation; the kept epoch marked."""
    epochs = [h.epoch for h in history]
    fig = Figure(figsize=(9, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h.train_accuracy for h in history], "o-", label="train")
    val = [h for h in history if h.val_loss is not None]
    if val:
        ax_loss.plot([h.epoch for h in val], [h.val_loss for h in val], "s-", label="val")
        ax_acc.plot([h.epoch for h in val], [h.val_accuracy for h in val], "s-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title=_title("loss", synthetic))
    ax_acc.set(
        xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title=_title("accuracy", synthetic)
    )
    for ax in (ax_loss, ax_acc):
        if selected is not None:
            ax.axvline(selected, color="grey", linestyle=":", label=f"kept: epoch {selected}")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def confusion(
    matrix: np.ndarray, labels: Sequence[str], path: Path, *, title: str, synthetic: bool
) -> None:
    """Confusion matrix, rows = true class, columns = predicted class."""
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = list(range(len(labels)))
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="true", title=_title(title, synthetic))
    peak = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(int(value)),
            ha="center",
            va="center",
            color="white" if peak and value > peak / 2 else "black",
        )
    _save(fig, path)


def roc(
    fpr: np.ndarray, tpr: np.ndarray, auc: Auc, path: Path, *, title: str, synthetic: bool
) -> None:
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    label = f"AUC {fmt(auc)}" if auc.value is not None else "AUC undefined (one class)"
    ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=_title(title, synthetic),
    )
    ax.legend(loc="lower right")
    _save(fig, path)


def reliability(
    before: Reliability,
    after: Reliability | None,
    path: Path,
    *,
    title: str,
    synthetic: bool,
    after_label: str = "temperature-scaled",
) -> None:
    """Observed share of ALL against mean predicted p(ALL) per bin, before and after
    temperature scaling, with the number of images per bin underneath."""
    fig = Figure(figsize=(5.2, 5.6))
    ax, ax_n = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfect calibration")
    centres = (before.edges[:-1] + before.edges[1:]) / 2
    width = before.edges[1] - before.edges[0]
    curves = [("uncalibrated", before, "o-")]
    if after is not None:
        curves.append((after_label, after, "s-"))
    for i, (name, rel, style) in enumerate(curves):
        used = rel.count > 0
        ax.plot(rel.mean_p[used], rel.observed[used], style, label=f"{name}: ECE {rel.ece:.3f}")
        offset = (i - (len(curves) - 1) / 2) * width * 0.4
        ax_n.bar(centres + offset, rel.count, width=width * 0.4, label=name)
    ax.set(
        ylabel="observed share of ALL",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        title=_title(title, synthetic),
    )
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    ax_n.set(xlabel="predicted p(ALL)", ylabel="images")
    ax_n.grid(alpha=0.3)
    _save(fig, path)
