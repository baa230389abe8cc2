"""The quality floor: export refuses a model that shows no evidence of skill.

The fidelity gate (gate.py) asks whether the deployed IR is the model TensorFlow
measured; it says nothing about whether that model learnt anything. A head trained
for one epoch at a learning rate of 1e-6 (every p(ALL) near 0.5) and a fine-tune
from random weights (ROC AUC 0.22) both passed it. So, on the labelled eval split
(test), with the deployed model's probabilities:

- ROC AUC: the lower end of its 95% bootstrap interval must be above 0.5 (chance);
- Brier score: better than the prior's, the Brier of predicting the training
  split's prevalence of ALL for every image, by at least MIN_BRIER_SKILL (10%) of it,
  with the lower end of the paired bootstrap interval of the improvement above 0.
  The 10% is what makes a near-untrained head fail: one epoch at lr 1e-6 ranks the
  images already (its first steps move along the class means), but every p(ALL) stays
  within a few thousandths of 0.5, Brier 0.244 against the prior's 0.25 (2.4%
  better): its probabilities say nothing a node could act on.

Both intervals resample patients/smears when the split has groups. A model that
fails either is refused (`QualityError`, exit code 3) unless `--allow-no-skill`,
which exports it flagged `no-skill` everywhere (hub, node status, every Result).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellwatch.shared.provenance import QualityFloor
from cellwatch.training.errors import QualityError
from cellwatch.training.stats import bootstrap_auc, bootstrap_mean_ci

CHANCE_AUC = 0.5
MIN_BRIER_SKILL = 0.1
"""The Brier score must be at least this share below the prior's (1 - Brier / prior's)."""
__all__ = ["CHANCE_AUC", "MIN_BRIER_SKILL", "QualityError", "QualityFloor", "assess"]


def assess(
    y_true: np.ndarray,
    p_pos: np.ndarray,
    prior: float,
    *,
    split: str,
    groups: Sequence[str] | None = None,
) -> QualityFloor:
    """The floor's verdict on labels y_true and probabilities of ALL p_pos (not overridden);
    prior: the training split's share of ALL."""
    y = np.asarray(y_true, np.float64)
    p = np.asarray(p_pos, np.float64)
    auc = bootstrap_auc(y, p, groups=groups)
    model = (p - y) ** 2
    baseline = (prior - y) ** 2
    gain_lo, gain_hi = bootstrap_mean_ci(baseline - model, groups)
    reasons = []
    if auc.ci95 is None:
        reasons.append(f"no ROC AUC on the {split} split (one class only)")
    elif auc.ci95[0] <= CHANCE_AUC:
        reasons.append(
            f"ROC AUC {auc.value:.2f} (95% CI {auc.ci95[0]:.2f}-{auc.ci95[1]:.2f}) does not "
            f"exclude chance ({CHANCE_AUC})"
        )
    skill = 1.0 - model.mean() / baseline.mean() if baseline.mean() > 0 else 0.0
    if gain_lo <= 0.0 or skill < MIN_BRIER_SKILL:
        reasons.append(
            f"Brier {model.mean():.3f} is not shown better than the prior's {baseline.mean():.3f} "
            f"by {MIN_BRIER_SKILL:.0%} (it is {skill:.1%} better; improvement 95% CI "
            f"{gain_lo:.3f} to {gain_hi:.3f})"
        )
    return QualityFloor(
        split=split,
        n=len(y),
        auc_ci_low=None if auc.ci95 is None else auc.ci95[0],
        brier=float(model.mean()),
        prior_brier=float(baseline.mean()),
        brier_gain_ci95=(gain_lo, gain_hi),
        passed=not reasons,
        overridden=False,
        reasons=reasons,
    )
