"""Calibration and the decision rule, both chosen on the validation split.

Temperature scaling: one scalar T > 0 divides the logits, fit by minimising the
validation negative log-likelihood (Guo et al. 2017). It never changes which class
has the larger logit, only how confident the probabilities are. The fit is bounded
(T in [TEMPERATURE_MIN, TEMPERATURE_MAX]): a validation split the model separates
perfectly has no finite optimum, and a few dozen images should not make a model
certain. Export folds 1/T into the final 1x1 convolution, so the shipped network is
still plain Inception V3 and its softmax is the calibrated one.

It is kept only if it does not make the validation ECE worse; otherwise the
uncalibrated logits ship and the manifest says so (`applied: false`, `note`).

ECE and the reliability diagram are computed on p(ALL) in BINS equal-width bins
(binary calibration: predicted probability of ALL against the observed share of
ALL); Brier is the mean of (p(ALL) - y)^2.

Decision rule (`Decision`):
- threshold: the highest value <= 0.5 at which validation sensitivity reaches the
  target (default 0.95). It sits halfway between the last positive it must include
  and the next lower validation score, so a little numeric noise does not flip it.
  The target only ever lowers the threshold below argmax's 0.5, trading specificity
  for sensitivity, because a missed blast costs more than a second look.
- low-confidence band [lo, hi]: at least `half_width` either side of the threshold,
  widened to cover every validation error. A Result inside it is flagged
  `low_confidence`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellwatch.shared.manifest import Calibration, Decision

BINS = 10
TEMPERATURE_MIN = 0.25
TEMPERATURE_MAX = 8.0
DEFAULT_TARGET_SENSITIVITY = 0.95
DEFAULT_BAND_HALF_WIDTH = 0.1
_GOLDEN = (math.sqrt(5) - 1) / 2


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Bounded NLL-optimal T: golden-section search on 1/T (the NLL is convex in 1/T)."""
    lo, hi = 1.0 / TEMPERATURE_MAX, 1.0 / TEMPERATURE_MIN
    a, b = lo + (1 - _GOLDEN) * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = nll(logits, y, 1 / a), nll(logits, y, 1 / b)
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - _GOLDEN) * (hi - lo)
            fa = nll(logits, y, 1 / a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = nll(logits, y, 1 / b)
    return float(1.0 / ((lo + hi) / 2))


@dataclass(frozen=True)
class Reliability:
    """Per-bin mean predicted p(ALL), observed share of ALL and count."""

    edges: np.ndarray
    mean_p: np.ndarray
    observed: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        total = int(self.count.sum())
        if total == 0:
            return 0.0
        used = self.count > 0
        gaps = np.abs(self.mean_p[used] - self.observed[used])
        return float(np.sum(gaps * self.count[used]) / total)


def reliability(p_pos: np.ndarray, y: np.ndarray, bins: int = BINS) -> Reliability:
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p_pos, edges[1:-1], right=False), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=p_pos, minlength=bins)
    hits = np.bincount(which, weights=y.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sums / np.maximum(count, 1), np.nan)
        observed = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
    return Reliability(edges, mean_p, observed, count)


def ece(p_pos: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    return reliability(p_pos, y, bins).ece


def brier(p_pos: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((np.asarray(p_pos, np.float64) - y) ** 2))


def calibrate(logits: np.ndarray, y: np.ndarray) -> Calibration:
    """Fit T on validation logits [N, 2] and labels y; keep it only if ECE does not worsen."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return Calibration(temperature=1.0, applied=False, n=0, note="no validation images")
    if len(set(y.tolist())) < 2:
        p = softmax(logits)[:, 1]
        return Calibration(
            temperature=1.0,
            applied=False,
            ece_before=ece(p, y),
            ece_after=ece(p, y),
            brier=brier(p, y),
            n=len(y),
            note="validation split has one class only: not calibrated",
        )
    t = fit_temperature(logits, y)
    before, after = softmax(logits)[:, 1], softmax(np.asarray(logits) / t)[:, 1]
    ece_before, ece_after = ece(before, y), ece(after, y)
    notes = []
    if t <= TEMPERATURE_MIN * 1.001:
        notes.append(
            f"temperature at its lower bound {t:.3g}: the model separates the validation "
            "split perfectly, which is too easy or too small to calibrate on"
        )
    elif t >= TEMPERATURE_MAX * 0.999:
        notes.append(
            f"temperature at its upper bound {t:.3g}: the model is near chance on the "
            "validation split"
        )
    applied = ece_after <= ece_before
    if not applied:
        notes.append(
            f"temperature {t:.3g} made validation ECE worse ({ece_before:.3f} -> "
            f"{ece_after:.3f}): kept the uncalibrated logits"
        )
    return Calibration(
        temperature=t,
        applied=applied,
        ece_before=ece_before,
        ece_after=ece_after,
        brier=brier(after if applied else before, y),
        n=len(y),
        note="; ".join(notes) or None,
    )


def choose_decision(
    p_pos: np.ndarray,
    y: np.ndarray,
    *,
    positive_label: str,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    half_width: float = DEFAULT_BAND_HALF_WIDTH,
    threshold: float | None = None,
) -> Decision:
    """Threshold and low-confidence band from validation probabilities of the positive class
    (threshold: fixed by the user instead of chosen)."""
    p = np.asarray(p_pos, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    target = f"sensitivity>={target_sensitivity:g} on validation"
    positives = np.sort(p[y])[::-1]
    if threshold is not None:
        target = f"fixed threshold {threshold:g} (--threshold)"
    elif len(positives) == 0:
        threshold = 0.5
        target += " (no positive validation images: argmax threshold)"
    else:
        k = max(1, math.ceil(target_sensitivity * len(positives) - 1e-9))
        kth = float(positives[k - 1])
        lower = p[p < kth]
        below = float(lower.max()) if len(lower) else 0.0
        threshold = min(0.5, (kth + below) / 2)
    threshold = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    lo, hi = threshold - half_width, threshold + half_width
    pred = p >= threshold
    missed, false_alarms = p[y & ~pred], p[~y & pred]
    if len(missed):
        lo = min(lo, float(missed.min()))
    if len(false_alarms):
        hi = max(hi, float(false_alarms.max()))
    return Decision(
        positive_label=positive_label,
        threshold=threshold,
        low_confidence=(max(0.0, lo), min(1.0, hi)),
        target=target,
    )
