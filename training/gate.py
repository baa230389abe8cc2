"""The export gates: the deployed model must be the model we measured, and have skill.

**Fidelity** (`judge`, `Gate` in shared/provenance.py): paired comparisons of the
deployed IR (OpenVINO's default inference precision on the export machine's CPU)
with TensorFlow on the same images, so every difference is one the conversion made:

- agreement: share of images where the deployed decision (label at the bundle's
  threshold) equals TensorFlow's, on every image of train, val and test (it needs
  no labels, and more images give a narrower interval). Refused below `min_agreement`.
- sensitivity drop: TensorFlow's sensitivity minus the deployed IR's on the labelled
  eval split. Refused above `max_sensitivity_drop`. Sensitivity is the figure a
  missed blast costs.
- max |p difference| over every image measured, for every precision. Refused above
  `max_prob_diff` (default LOW_PRECISION_TOLERANCE, 0.1: what the node's own
  self-test allows a device that does not compute in f32; a bundle that moves a
  probability further on the machine that made it is not the model evaluated).

Defaults, and why:
- min_agreement 0.98: a model whose decisions move on more than 1 image in 50 is a
  different model from the one evaluated. On sets under 50 images it means no
  changed decision at all, which is the only reading a small set supports.
- max_sensitivity_drop 0.02: at most one lost blast per 50 positives, the same budget
  as agreement spent entirely on the costly side. With fewer than 50 positives it
  again means none.

`--allow-degraded` exports anyway; the gate's figures and `overridden: true` go into
the manifest's provenance, and hub, node and every Result show the model as degraded.

**Quality floor** (quality.py) is the other gate: evidence that the model has skill
at all.
"""

from __future__ import annotations

from cellwatch.node.engine import LOW_PRECISION_TOLERANCE
from cellwatch.shared.provenance import Gate
from cellwatch.training.errors import GateError
from cellwatch.training.stats import MetricSet, Proportion

DEFAULT_MIN_AGREEMENT = 0.98
DEFAULT_MAX_SENSITIVITY_DROP = 0.02
DEFAULT_MAX_PROB_DIFF = LOW_PRECISION_TOLERANCE
__all__ = [
    "DEFAULT_MAX_PROB_DIFF",
    "DEFAULT_MAX_SENSITIVITY_DROP",
    "DEFAULT_MIN_AGREEMENT",
    "Gate",
    "GateError",
    "judge",
]


def judge(
    agreement: Proportion,
    tensorflow: MetricSet,
    deployed: MetricSet,
    max_prob_diff: float,
    *,
    min_agreement: float,
    max_sensitivity_drop: float,
    max_prob_diff_limit: float = DEFAULT_MAX_PROB_DIFF,
) -> Gate:
    """The gate's verdict (not yet overridden): agreement over the images it was
    measured on, sensitivity on the labelled eval split, max |p difference| over all."""
    tf_sens, dep_sens = tensorflow.sensitivity.value, deployed.sensitivity.value
    drop = None if tf_sens is None or dep_sens is None else tf_sens - dep_sens
    gate = Gate(
        min_agreement=min_agreement,
        max_sensitivity_drop=max_sensitivity_drop,
        max_prob_diff_limit=max_prob_diff_limit,
        agreement=agreement.value,
        agreement_n=agreement.n,
        sensitivity_drop=drop,
        max_prob_diff=max_prob_diff,
        passed=True,
        overridden=False,
    )
    return gate.model_copy(update={"passed": not gate.failures()})
