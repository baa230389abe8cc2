"""Intervals, calibration and the decision rule: the arithmetic, on numbers we can check."""

from __future__ import annotations

import numpy as np
import pytest

from cellwatch.training.calibration import (
    TEMPERATURE_MIN,
    brier,
    calibrate,
    choose_decision,
    ece,
    fit_temperature,
    softmax,
)
from cellwatch.training.gate import judge
from cellwatch.training.stats import agreement, auc_value, bootstrap_auc, fmt, metric_set, wilson


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


def test_a_calibration_that_worsens_ece_is_not_applied() -> None:
    """Six validation images whose NLL-optimal temperature (0.63) doubles the binned ECE
    (0.15 -> 0.33): the uncalibrated logits are kept and the manifest says so."""
    margin = np.array([-0.5, 1.3, -0.7, 2.6, 0.3, -0.6])
    logits = np.stack([np.zeros(6), margin], axis=1)
    y = np.array([1, 1, 0, 1, 0, 0])
    c = calibrate(logits, y)
    assert c.temperature == pytest.approx(0.63, abs=0.01)
    assert c.ece_before is not None and c.ece_after is not None
    assert c.ece_after > c.ece_before
    assert not c.applied and c.note is not None and "kept the uncalibrated logits" in c.note
    assert c.brier == pytest.approx(brier(softmax(logits)[:, 1], y))  # of what ships


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
    ok = judge(agreement(np.ones(50), np.ones(50)), tf, same, min_agreement=0.98, max_drop=0.02)
    assert ok.passed and ok.sensitivity_drop == 0.0 and not ok.failures()
    flips = np.array([1] * 49 + [0])
    bad = judge(agreement(flips, np.ones(50)), tf, lost, min_agreement=0.99, max_drop=0.02)
    assert not bad.passed
    assert bad.failures() == [
        "top-1 agreement with TensorFlow 0.980 < --min-agreement 0.99",
        "sensitivity drop 0.333 > --max-drop 0.02",
    ]
