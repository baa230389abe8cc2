"""The quality floor (issue 18, point 2): no evidence of skill, no export without the
override, and the override flags the bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellwatch.training.errors import QualityError
from cellwatch.training.export import ExportOptions, export
from cellwatch.training.measure import Candidate, Inputs, Limits, meets_on_validation
from cellwatch.training.quality import assess
from tests.training.helpers import assert_one_line_error, train
from tests.training.sizes import TEST_BASE

Y = np.array([0, 1] * 20)


def test_a_near_untrained_head_shows_no_skill() -> None:
    """Every p(ALL) near 0.5 (a head trained 1 epoch at lr 1e-6): Brier 0.25 - tiny,
    ROC AUC near chance. Refused, with the reasons named."""
    p = 0.5 + np.random.default_rng(1).normal(0, 0.003, len(Y))
    floor = assess(Y, p, prior=0.5, split="test")
    assert floor.passed is False and not floor.overridden
    assert floor.auc_ci_low is not None and floor.auc_ci_low <= 0.5
    assert floor.brier == pytest.approx(0.25, abs=0.001) and floor.prior_brier == 0.25
    assert any("does not exclude chance" in r for r in floor.reasons)


def test_a_head_that_ranks_but_stays_at_one_half_is_refused() -> None:
    """What one epoch at lr 1e-6 does (measured: validation accuracy 0.94, yet every
    p(ALL) within 0.01 of 0.5): a perfect ranking, a Brier 2% better than the prior's.
    Refused by the 10% rule, which the interval alone would not do."""
    p = 0.5 + 0.025 * (2 * Y - 1)
    floor = assess(Y, p, prior=0.5, split="test")
    assert floor.auc_ci_low == 1.0 and floor.brier_gain_ci95 is not None
    assert floor.brier_gain_ci95[0] > 0  # consistently (if slightly) better than the prior
    assert floor.passed is False
    assert floor.reasons == [
        "Brier 0.226 is not shown better than the prior's 0.250 by 10% (it is 9.7% better; "
        "improvement 95% CI 0.024 to 0.024)"
    ]


def test_a_brier_gain_that_rests_on_luck_is_refused() -> None:
    """Ranks perfectly and is 44% better than the prior on average, but misses 3 of 10
    blasts with p(ALL) 0.05: resampled, the improvement's interval reaches below 0."""
    p = np.where(Y == 1, 0.9, 0.01)
    p[np.nonzero(Y == 1)[0][:3]] = 0.05
    floor = assess(Y[:20], p[:20], prior=0.5, split="test")
    assert floor.auc_ci_low == 1.0 and floor.brier_gain_ci95 is not None
    assert floor.brier_gain_ci95[0] < 0 < 0.44 < 1 - (floor.brier or 1) / 0.25
    assert floor.passed is False and len(floor.reasons) == 1 and "Brier" in floor.reasons[0]


def test_a_worse_than_chance_ranking_is_refused() -> None:
    """A fine-tune from random weights measured ROC AUC 0.22."""
    floor = assess(Y, np.where(Y == 1, 0.3, 0.7), prior=0.5, split="test")
    assert floor.passed is False
    assert floor.auc_ci_low is not None and floor.auc_ci_low < 0.5


def test_brier_must_beat_the_prior_even_with_a_perfect_ranking() -> None:
    """Ranks perfectly (ROC AUC 1) but says 0.98-0.99 for everything: worse than saying
    the prevalence, so no evidence that its probabilities are worth shipping."""
    floor = assess(Y, np.where(Y == 1, 0.99, 0.98), prior=0.5, split="test")
    assert floor.auc_ci_low == 1.0
    assert floor.passed is False
    assert floor.reasons and all("Brier" in r for r in floor.reasons)


def test_a_skilled_model_passes_and_groups_widen_the_interval() -> None:
    """8 patients of 5 images (each patient one class, with its own shift of p): the
    bootstrap by patient gives a wider interval than one that treats 40 images as 40
    independent cases (issue 18, point 5)."""
    rng = np.random.default_rng(2)
    patient = np.arange(40) // 5
    y = patient % 2
    shift = rng.normal(0, 0.12, 8)[patient]
    p = np.clip(np.where(y == 1, 0.75, 0.25) + shift + rng.normal(0, 0.03, 40), 0.01, 0.99)
    floor = assess(y, p, prior=0.5, split="test")
    assert floor.passed is True and floor.reasons == []
    groups = [f"patient{g}" for g in patient]
    by_patient = assess(y, p, prior=0.5, split="test", groups=groups)
    assert by_patient.brier_gain_ci95 is not None and floor.brier_gain_ci95 is not None
    lo, hi = by_patient.brier_gain_ci95
    assert hi - lo > floor.brier_gain_ci95[1] - floor.brier_gain_ci95[0]


@pytest.mark.slow
def test_export_refuses_the_unskilled_tiny_run(
    trained_run: Path, signing_key: Path, tmp_path: Path
) -> None:
    options = ExportOptions(
        name="noskill", version="1", precision="fp32", sign_key=signing_key, base_is=TEST_BASE
    )
    with pytest.raises(QualityError, match="no evidence of skill on 6 test images"):
        export(trained_run, tmp_path / "refused", options)
    assert not (tmp_path / "refused").exists()
    result = train(
        *("export", trained_run, "--out", tmp_path / "b", "--name", "x", "--version", "1"),
        *("--sign-key", signing_key, "--base-is", TEST_BASE),
    )
    assert_one_line_error(result, "--allow-no-skill", exit_code=3)
    assert not (tmp_path / "b").exists()


def test_int8_is_judged_on_validation_never_test() -> None:
    """Issue 18, point 2: `--int8-method auto` decides on the validation rows only. Here
    the candidate moves test decisions (rows 0-1) and keeps validation's (rows 2-3)."""
    reference = np.array([[0.4, 0.6], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    moved = reference.copy()
    moved[:2] = moved[:2, ::-1]  # both test decisions flip
    inputs = Inputs(np.zeros((5, 1)), reference, n_eval=2, val=slice(2, 4), calibration_set=[])
    c = Candidate("ptq", moved, moved, "f32", 0.0)
    assert meets_on_validation(c, inputs, 0.5, Limits(0.98, 0.02, 0.1)) is True
    c_val = Candidate("ptq", reference[:, ::-1].copy(), reference, "f32", 0.0)
    assert meets_on_validation(c_val, inputs, 0.5, Limits(0.98, 0.02, 0.1)) is False
