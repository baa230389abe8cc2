"""Calibration and the decision rule, both chosen on the validation split.

Temperature scaling: one scalar T > 0 divides the logits, fit by minimising the
validation negative log-likelihood (Guo et al. 2017). It never changes which class
has the larger logit, only how confident the probabilities are. Export folds 1/T into
the final 1x1 convolution, so the shipped network is still plain Inception V3.

When a temperature is applied (the rule, `RULE`), and why:
- at least MIN_CALIBRATION_IMAGES (30) validation images with both classes: below
  that a single image moves the fitted T a long way (the first review's run fitted
  T = 0.25 on 16 images and made a missed blast's p(ALL) 0.0004);
- the fit is inside its bounds [TEMPERATURE_MIN, TEMPERATURE_MAX]: at a bound the
  optimum lies beyond it and the fitted value is an artefact of the bound;
- cross-validated on the validation split: T is refit on K-1 folds and scored by NLL
  on the held-out fold (K = 5, stratified); the cross-validated NLL must be lower
  than T = 1's. Judging T on the images it was fit on (as the first version did with
  ECE) always flatters it;
- T < 1 sharpens every probability, errors included, so it needs more: at least
  MIN_SHARPEN_IMAGES (100) validation images and T < 1 in every fold.
Otherwise the uncalibrated logits ship, and the manifest and the model card say why
(`applied: false`, `note`). Export also reports ECE, NLL and Brier on the test split
for both the shipped and the uncalibrated probabilities, and how many test errors
fall inside the low-confidence band (`Calibration.test`, `check`).

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

from cellwatch.shared.manifest import Calibration, CalibrationCheck, Decision

BINS = 10
TEMPERATURE_MIN = 0.25
TEMPERATURE_MAX = 8.0
MIN_CALIBRATION_IMAGES = 30
MIN_SHARPEN_IMAGES = 100
CV_FOLDS = 5
RULE = (
    f"applied only with >= {MIN_CALIBRATION_IMAGES} validation images of both classes, "
    f"T inside [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}], a {CV_FOLDS}-fold cross-validated "
    f"NLL below T = 1's, and for T < 1 (sharper) >= {MIN_SHARPEN_IMAGES} images and T < 1 "
    "in every fold"
)
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
    """Fit T on validation logits [N, 2] and labels y; apply it only under RULE."""
    y = np.asarray(y, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    if len(y) == 0:
        return Calibration(
            temperature=1.0, applied=False, n=0, rule=RULE, note="no validation images"
        )
    p_raw = softmax(logits)[:, 1]
    before = {
        "ece_before": ece(p_raw, y),
        "nll_before": nll(logits, y, 1.0),
        "n": len(y),
        "rule": RULE,
    }
    if len(set(y.tolist())) < 2:
        return Calibration(
            temperature=1.0,
            applied=False,
            brier=brier(p_raw, y),
            note="validation split has one class only: not calibrated",
            **before,
        )
    t = fit_temperature(logits, y)
    p_fit = softmax(logits / t)[:, 1]
    fitted = {"ece_after": ece(p_fit, y), "nll_after": nll(logits, y, t)}
    cv_before, cv_after, fold_ts = cross_validated_nll(logits, y)
    reasons = []
    if len(y) < MIN_CALIBRATION_IMAGES:
        reasons.append(
            f"too few validation images to calibrate on ({len(y)} < {MIN_CALIBRATION_IMAGES}): "
            f"the fitted T {t:.3g} would rest on a handful of them"
        )
    if t <= TEMPERATURE_MIN * 1.001:
        reasons.append(
            f"T at its lower bound {t:.3g}: the validation NLL keeps falling as the logits are "
            "sharpened, so its optimum lies beyond the bound (the logits are small on this "
            "split: an under-confident model, or a split too small to show its errors); "
            "sharpening that much would make errors confident"
        )
    elif t >= TEMPERATURE_MAX * 0.999:
        reasons.append(
            f"T at its upper bound {t:.3g}: the model is near chance on the validation split"
        )
    if cv_after is not None and cv_before is not None and cv_after >= cv_before:
        reasons.append(
            f"cross-validated NLL with T refit per fold {cv_after:.3f} is not below T = 1's "
            f"{cv_before:.3f}: no evidence that T helps on images it was not fit on"
        )
    if t < 1.0 and not reasons:
        if len(y) < MIN_SHARPEN_IMAGES:
            reasons.append(
                f"T {t:.3g} < 1 would sharpen every probability, errors included; that needs "
                f">= {MIN_SHARPEN_IMAGES} validation images (have {len(y)})"
            )
        elif any(ft >= 1.0 for ft in fold_ts):
            reasons.append(f"T {t:.3g} < 1 but not in every fold ({_ts(fold_ts)})")
    applied = not reasons
    return Calibration(
        temperature=t,
        applied=applied,
        brier=brier(p_fit if applied else p_raw, y),
        cv_nll_before=cv_before,
        cv_nll_after=cv_after,
        note=("not applied: " + "; ".join(reasons)) if reasons else None,
        **before,
        **fitted,
    )


def _ts(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def cross_validated_nll(
    logits: np.ndarray, y: np.ndarray, folds: int = CV_FOLDS
) -> tuple[float | None, float | None, list[float]]:
    """(NLL at T = 1, NLL with T refit on the other folds, each fold's T): stratified
    folds, each image held out once; (None, None, []) with fewer than 2 per class."""
    y = np.asarray(y, np.int64)
    counts = np.bincount(y, minlength=2)
    k = int(min(folds, counts.min()))
    if k < 2:
        return None, None, []
    fold_of = np.empty(len(y), np.int64)
    for label in (0, 1):
        idx = np.nonzero(y == label)[0]
        fold_of[idx] = np.arange(len(idx)) % k
    losses_after = np.empty(len(y))
    fold_ts = []
    for f in range(k):
        held = fold_of == f
        t = fit_temperature(logits[~held], y[~held])
        fold_ts.append(t)
        z = np.asarray(logits[held], np.float64) / t
        z = z - z.max(axis=1, keepdims=True)
        losses_after[held] = np.log(np.exp(z).sum(axis=1)) - z[np.arange(held.sum()), y[held]]
    return nll(logits, y, 1.0), float(losses_after.mean()), fold_ts


def check(
    shipped: np.ndarray, temperature: float, applied: bool, y: np.ndarray, decision: Decision
) -> CalibrationCheck:
    """The shipped probabilities of ALL on a held-out split (test) beside the
    uncalibrated ones (recovered exactly: the shipped logits are the raw ones / T)."""
    y = np.asarray(y, np.int64)
    p = np.clip(np.asarray(shipped, np.float64), 1e-300, 1.0)
    log_odds = np.log(p) - np.log(np.clip(1.0 - p, 1e-300, 1.0))
    raw_logits = np.stack(
        [np.zeros_like(log_odds), log_odds * (temperature if applied else 1.0)], 1
    )
    p_raw = softmax(raw_logits)[:, 1]
    shipped_logits = np.stack([np.zeros_like(log_odds), log_odds], 1)
    wrong = (p >= decision.threshold) != y.astype(bool)
    lo, hi = decision.low_confidence
    in_band = wrong & (p >= lo) & (p <= hi)
    sharper = wrong & (np.abs(p - decision.threshold) > np.abs(p_raw - decision.threshold) + 1e-12)
    return CalibrationCheck(
        n=len(y),
        ece=ece(p, y),
        nll=nll(shipped_logits, y, 1.0),
        brier=brier(p, y),
        ece_uncalibrated=ece(p_raw, y),
        nll_uncalibrated=nll(raw_logits, y, 1.0),
        brier_uncalibrated=brier(p_raw, y),
        errors=int(wrong.sum()),
        errors_in_band=int(in_band.sum()),
        errors_more_confident=int(sharper.sum()),
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
