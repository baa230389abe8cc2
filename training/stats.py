"""Figures with their uncertainty: Wilson intervals for proportions, a bootstrap for ROC AUC.

A metric on a few dozen test images is a guess with a wide error bar; every figure
cellwatch shows carries its 95% interval and its counts so the reader can tell
32/32 (0.89-1.00) from 320/320 (0.99-1.00).

- Proportions (accuracy, sensitivity, specificity, precision, NPV, agreement):
  Wilson score interval, which stays inside [0, 1] and is sensible at 0/n and n/n.
  A proportion whose denominator is zero (specificity with no negatives) has value
  and interval null, never 0.
- ROC AUC: percentile bootstrap over images, resampling positives and negatives
  separately (each resample keeps both classes); when the images have groups
  (patients or smears, `prepare --groups`), whole groups are resampled instead,
  since images of one patient are not independent. With perfect separation every
  resample gives 1.0 and the interval collapses to [1, 1]: read it with n.
- Unit-level figures (`unit_figures`): the same figures with the patient/smear as
  the unit, reported beside the image-level ones with the number of units.

ALL (label index 1) is the positive class; the decision is `p_ALL >= threshold`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellwatch.shared.figures import Z95, Auc, MetricSet, Proportion, wilson

__all__ = [
    "Z95",
    "Auc",
    "MetricSet",
    "Proportion",
    "agreement",
    "auc_value",
    "bootstrap_auc",
    "bootstrap_mean_ci",
    "fmt",
    "metric_set",
    "unit_figures",
    "unit_members",
    "wilson",
]
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240611
"""Fixed, so the same predictions always give the same interval."""


def auc_value(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score_pos > score_neg) + P(tie) / 2."""
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    at_or_below = np.searchsorted(neg_sorted, pos, side="right")
    return float(np.mean((below + at_or_below) / 2.0) / len(neg))


def bootstrap_auc(
    y_true: np.ndarray,
    score: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    groups: Sequence[str] | None = None,
) -> Auc:
    """ROC AUC with a percentile-bootstrap interval.

    Without groups, images are resampled (positives and negatives separately). With
    groups (a patient or smear per image), whole groups are resampled with replacement
    (the cluster bootstrap: images of one patient are not independent), and a resample
    that lacks a class is drawn again.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return Auc(value=None, ci95=None, n=len(s), resamples=0)
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    if groups is None:
        for i in range(resamples):
            values[i] = auc_value(
                pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]
            )
    else:
        members = unit_members(groups)
        for i in range(resamples):
            while True:
                take = np.concatenate(
                    [members[j] for j in rng.integers(0, len(members), len(members))]
                )
                yy = y[take]
                if yy.any() and not yy.all():
                    break
            values[i] = auc_value(s[take][yy], s[take][~yy])
    lo, hi = np.percentile(values, [2.5, 97.5])
    return Auc(
        value=auc_value(pos, neg),
        ci95=(float(lo), float(hi)),
        n=len(s),
        resamples=resamples,
        units=None if groups is None else len(set(groups)),
    )


def unit_members(groups: Sequence[str]) -> list[np.ndarray]:
    """Indices of each group's images, groups in first-seen order."""
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    return [np.array(v, np.int64) for v in order.values()]


def bootstrap_mean_ci(
    values: np.ndarray,
    groups: Sequence[str] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean of per-image values (by group when
    groups are given: each resample draws whole groups)."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng([seed, 1])
    members = unit_members(groups) if groups is not None else [np.array([i]) for i in range(len(v))]
    sums = np.array([v[m].sum() for m in members])
    counts = np.array([len(m) for m in members], np.float64)
    draws = rng.integers(0, len(members), (resamples, len(members)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def metric_set(
    y_true: np.ndarray,
    p_pos: np.ndarray,
    threshold: float = 0.5,
    groups: Sequence[str] | None = None,
) -> MetricSet:
    """Every figure of labels y_true (1 = ALL) against probabilities of ALL p_pos
    (groups: the ROC AUC's bootstrap resamples them instead of images)."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(p_pos) >= threshold
    tp = int(np.sum(y & pred))
    tn = int(np.sum(~y & ~pred))
    fp = int(np.sum(~y & pred))
    fn = int(np.sum(y & ~pred))
    return MetricSet(
        accuracy=wilson(tp + tn, len(y)),
        sensitivity=wilson(tp, tp + fn),
        specificity=wilson(tn, tn + fp),
        precision=wilson(tp, tp + fp),
        npv=wilson(tn, tn + fn),
        roc_auc=bootstrap_auc(y, np.asarray(p_pos), groups=groups),
        n=len(y),
        threshold=threshold,
        confusion=[[tn, fp], [fn, tp]],
    )


def unit_figures(
    y_true: np.ndarray, p_pos: np.ndarray, groups: Sequence[str], threshold: float
) -> tuple[int, MetricSet]:
    """Figures with the patient/smear as the unit: a unit is ALL when any image is, and
    its score is its highest p(ALL). Returns (units, figures)."""
    members = unit_members(groups)
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(p_pos, np.float64)
    unit_y = np.array([y[m].any() for m in members])
    unit_p = np.array([p[m].max() for m in members])
    return len(members), metric_set(unit_y, unit_p, threshold)


def agreement(a: np.ndarray, b: np.ndarray) -> Proportion:
    """Share of items where two decision vectors agree, with its Wilson interval."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare decisions of shapes {a.shape} and {b.shape}")
    return wilson(int(np.sum(a == b)), len(a))


def fmt(est: Proportion | Auc, digits: int = 2, *, counts: bool = True) -> str:
    """`0.94 (95% CI 0.74-0.99, 17/18)`; `n/a (no cases)` for an undefined figure."""
    if est.value is None or est.ci95 is None:
        return "n/a (one class only)" if isinstance(est, Auc) else "n/a (no cases)"
    lo, hi = est.ci95
    text = f"{est.value:.{digits}f} (95% CI {lo:.{digits}f}-{hi:.{digits}f}"
    if counts and isinstance(est, Proportion):
        text += f", {est.k}/{est.n}"
    return text + ")"
