"""Intervals, calibration and the decision rule: the arithmetic, on numbers we can check."""

from __future__ import annotations

import numpy as np
import pytest

from cellwatch.shared.manifest import Decision
from cellwatch.training.calibration import (
    TEMPERATURE_MIN,
    brier,
    calibrate,
    check,
    choose_decision,
    ece,
    fit_temperature,
    softmax,
)
from cellwatch.training.gate import judge
from cellwatch.training.stats import (
    agreement,
    auc_value,
    bootstrap_auc,
    fmt,
    metric_set,
    unit_figures,
    wilson,
)


def test_wilson_intervals() -> None:
    full = wilson(32, 32)  # the README's old "1.00 on 160 smears" was 32/32
    assert full.value == 1.0 and full.ci95 is not None
    assert full.ci95[0] == pytest.approx(0.8928, abs=1e-4) and full.ci95[1] == 1.0
    half = wilson(9, 18)
    assert half.ci95 == pytest.approx((0.2903, 0.7097), abs=1e-4)
    assert wilson(0, 5).ci95 == pytest.approx((0.0, 0.4345), abs=1e-4)
    none = wilson(0, 0)
    assert none.value is None and none.ci95 is None and fmt(none) == "n/a (no cases)"
    assert fmt(wilson(17, 18)) == "0.94 (95% CI 0.74-0.99, 17/18)"
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_metric_set_counts_and_undefined_figures() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.4, 0.9, 0.8, 0.6, 0.3, 0.55, 0.2])
    m = metric_set(y, p)  # TN 3, FP 1, FN 2, TP 4
    assert m.confusion == [[3, 1], [2, 4]]
    assert (m.accuracy.k, m.accuracy.n) == (7, 10)
    assert (m.sensitivity.k, m.sensitivity.n) == (4, 6)
    assert (m.specificity.k, m.specificity.n) == (3, 4)
    assert (m.precision.k, m.precision.n) == (4, 5)
    assert (m.npv.k, m.npv.n) == (3, 5)
    assert m.roc_auc.value == pytest.approx(17.5 / 24)  # pairs ranked right, ties half
    lowered = metric_set(y, p, threshold=0.25)
    assert lowered.sensitivity.k == 5 and lowered.threshold == 0.25
    only_all = metric_set(np.array([1, 1, 1]), np.array([0.9, 0.8, 0.2]))
    assert only_all.specificity.value is None and only_all.specificity.ci95 is None
    assert only_all.roc_auc.value is None and only_all.npv.k == 0


def test_bootstrap_auc_interval() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 40)
    score = np.concatenate([rng.normal(0, 1, 40), rng.normal(1.5, 1, 40)])
    auc = bootstrap_auc(y, score)
    assert auc.ci95 is not None and auc.value is not None
    assert auc.ci95[0] < auc.value < auc.ci95[1] and auc.ci95[1] - auc.ci95[0] < 0.3
    assert auc == bootstrap_auc(y, score)  # seeded: the same interval every time
    assert auc_value(np.array([1.0, 2.0]), np.array([1.0, 0.0])) == pytest.approx(0.875)
    assert agreement(np.array([1, 0, 1]), np.array([1, 1, 1])).k == 2


def test_temperature_recovers_an_overconfident_model() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    margin = rng.normal(0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(np.int64)  # calibrated at T=1
    logits = np.stack([np.zeros(n), margin * 3.0], axis=1)  # three times too confident
    assert fit_temperature(logits, y) == pytest.approx(3.0, rel=0.1)
    c = calibrate(logits, y)
    assert c.applied and c.ece_after is not None and c.ece_before is not None
    assert c.ece_after < c.ece_before
    p = softmax(logits / c.temperature)[:, 1]
    assert c.brier == pytest.approx(brier(p, y)) and c.ece_after == pytest.approx(ece(p, y))


def scaled(n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n validation logits of a model calibrated at T = 1, multiplied by scale (so the
    NLL-optimal T is about scale), and their labels."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(np.int64)
    return np.stack([np.zeros(n), margin * scale], axis=1), y


def test_the_first_reviews_case_no_longer_sharpens_errors() -> None:
    """Issue 18, point 1: 16 validation images of an under-confident model drove T to its
    lower bound 0.25 (logits x 4) and a missed blast went from p(ALL) 0.13 to 0.0004.
    Now T is fitted but not applied, and the test errors keep their confidence."""
    margin = np.array([-0.6, -0.5, -0.45, -0.4, -0.35, -0.3, -0.25, -0.2])
    val = np.stack([np.zeros(16), np.concatenate([margin, -margin[::-1]])], axis=1)
    y_val = np.array([0] * 8 + [1] * 8)
    c = calibrate(val, y_val)
    assert c.temperature == pytest.approx(TEMPERATURE_MIN, rel=1e-3)
    assert not c.applied and c.note is not None
    assert "too few validation images" in c.note and "under-confident" in c.note
    assert "separates the validation split perfectly" not in c.note  # the old diagnosis
    # the shipped probabilities are the uncalibrated ones: the missed blast stays at 0.13
    missed = np.log(0.13 / 0.87)
    shipped = softmax(np.array([[0.0, missed]]) / (c.temperature if c.applied else 1.0))
    assert shipped[0, 1] == pytest.approx(0.13)
    rule = Decision(positive_label="ALL", threshold=0.5, low_confidence=(0.1, 0.6), target="t")
    checked = check(np.array([0.13, 0.9, 0.2]), c.temperature, c.applied, np.array([1, 1, 0]), rule)
    assert checked.errors == 1 and checked.errors_in_band == 1
    assert checked.errors_more_confident == 0
    assert checked.nll == pytest.approx(checked.nll_uncalibrated)


def test_check_recovers_the_uncalibrated_probabilities() -> None:
    logits, y = scaled(200, 1.0, seed=4)
    t = 0.5
    shipped = softmax(logits / t)[:, 1]
    rule = Decision(positive_label="ALL", threshold=0.5, low_confidence=(0.4, 0.6), target="t")
    checked = check(shipped, t, True, y, rule)
    assert checked.ece_uncalibrated == pytest.approx(ece(softmax(logits)[:, 1], y), abs=1e-9)
    assert checked.brier_uncalibrated == pytest.approx(brier(softmax(logits)[:, 1], y))
    assert checked.errors_more_confident == checked.errors > 0  # T < 1 sharpens every error


@pytest.mark.parametrize(
    ("n", "scale", "seed", "applied", "why"),
    [
        (20, 3.0, 20, False, "too few validation images"),  # overconfident, but 20 < 30
        (60, 3.0, 60, True, None),  # enough images, cross-validated: softened
        (60, 1.0, 60, False, "cross-validated NLL"),  # already calibrated: T does not help
        (60, 0.4, 61, False, "needs >= 100"),  # under-confident: sharpening needs more images
        (400, 0.4, 400, True, None),  # ... and is applied with them
    ],
)
def test_temperature_rule(n: int, scale: float, seed: int, applied: bool, why: str | None) -> None:
    logits, y = scaled(n, scale, seed)
    c = calibrate(logits, y)
    assert c.applied is applied, c.note
    assert c.rule is not None and c.cv_nll_before is not None and c.cv_nll_after is not None
    if why is not None:
        assert c.note is not None and why in c.note
    else:
        assert c.note is None and c.cv_nll_after < c.cv_nll_before


def test_separable_validation_hits_the_bound() -> None:
    logits = np.array([[0, -5.0], [0, -4.0], [0, 4.0], [0, 6.0]])
    c = calibrate(logits, np.array([0, 0, 1, 1]))
    assert c.temperature == pytest.approx(TEMPERATURE_MIN, rel=1e-3)
    assert c.note is not None and "bound" in c.note


def test_decision_threshold_reaches_the_target_and_the_band_covers_errors() -> None:
    p = np.array([0.05, 0.1, 0.3, 0.45, 0.35, 0.6, 0.8, 0.9, 0.95, 0.97])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    d = choose_decision(p, y, positive_label="ALL", target_sensitivity=0.95, half_width=0.1)
    # every positive must be found: below 0.35, halfway to the next lower score 0.3
    assert d.threshold == pytest.approx(0.325)
    assert metric_set(y, p, d.threshold).sensitivity.k == 6
    lo, hi = d.low_confidence
    assert lo == pytest.approx(0.225) and hi == pytest.approx(0.45)  # the false alarm at 0.45
    easy = choose_decision(np.array([0.1, 0.9]), np.array([0, 1]), positive_label="ALL")
    assert easy.threshold == 0.5 and easy.low_confidence == pytest.approx((0.4, 0.6))
    none = choose_decision(np.array([0.1, 0.2]), np.array([0, 0]), positive_label="ALL")
    assert none.threshold == 0.5 and "no positive" in none.target
    fixed = choose_decision(p, y, positive_label="ALL", threshold=0.7)
    assert fixed.threshold == 0.7 and fixed.target.startswith("fixed threshold")
    assert fixed.low_confidence[0] == pytest.approx(0.35)  # the missed ALL at 0.35


def test_gate_verdicts() -> None:
    y = np.array([0, 0, 1, 1, 1])
    tf = metric_set(y, np.array([0.1, 0.2, 0.8, 0.9, 0.7]))
    same = metric_set(y, np.array([0.1, 0.3, 0.8, 0.9, 0.7]))
    lost = metric_set(y, np.array([0.1, 0.2, 0.8, 0.9, 0.4]))
    same_agreement = agreement(np.ones(50), np.ones(50))
    ok = judge(same_agreement, tf, same, 0.1, min_agreement=0.98, max_sensitivity_drop=0.02)
    assert ok.passed and ok.sensitivity_drop == 0.0 and not ok.failures()
    flips = np.array([1] * 49 + [0])
    bad = judge(
        agreement(flips, np.ones(50)), tf, lost, 0.3, min_agreement=0.99, max_sensitivity_drop=0.02
    )
    assert not bad.passed
    assert bad.failures() == [
        "top-1 agreement with TensorFlow 0.980 < --min-agreement 0.99",
        "sensitivity drop 0.333 > --max-sensitivity-drop 0.02",
        "max |p difference| 0.3 > --max-prob-diff 0.1",
    ]
    # |p difference| is gated whatever the precision: 0.111 (an int8 bundle of the
    # first review) fails alone, with every decision kept
    moved = judge(same_agreement, tf, same, 0.111, min_agreement=0.98, max_sensitivity_drop=0.02)
    assert not moved.passed
    assert moved.failures() == ["max |p difference| 0.111 > --max-prob-diff 0.1"]


def test_bootstrap_by_group_resamples_patients() -> None:
    """Issue 18, point 5: with groups, the unit is the patient. 6 patients of 8 images,
    each patient one class, scores shifted per patient: resampling images treats 48
    images as 48 cases and gives a narrower interval than resampling the 6 patients."""
    rng = np.random.default_rng(5)
    patient = np.arange(48) // 8
    y = patient % 2
    score = y * 0.6 + rng.normal(0, 0.35, 6)[patient] + rng.normal(0, 0.05, 48)
    groups = [f"p{g}" for g in patient]
    by_image = bootstrap_auc(y, score)
    by_patient = bootstrap_auc(y, score, groups=groups)
    assert by_patient.value == by_image.value and by_patient.units == 6
    assert by_image.units is None
    assert by_image.ci95 is not None and by_patient.ci95 is not None
    assert by_patient.ci95[1] - by_patient.ci95[0] > by_image.ci95[1] - by_image.ci95[0]


def test_unit_figures_count_patients() -> None:
    y = np.array([1, 0, 0, 0, 0, 1])
    p = np.array([0.2, 0.1, 0.3, 0.2, 0.9, 0.8])
    units, figures = unit_figures(y, p, ["a", "a", "b", "b", "c", "c"], 0.5)
    # a: ALL (one blast), scored 0.2 -> missed; b: normal, 0.3 -> kept; c: ALL, 0.9 -> found
    assert units == 3 and figures.n == 3
    assert figures.confusion == [[1, 0], [1, 1]]
