"""The export gate: a bundle ships only if its deployed model still is the model we measured.

Two figures, both paired comparisons on the same test images (so every difference is
a decision the conversion changed, not sampling noise):

- agreement: share of test images where the deployed IR's decision (label at the
  bundle's threshold, OpenVINO's default inference precision on the export machine's
  CPU) equals TensorFlow's. Refused below `min_agreement`.
- sensitivity drop: TensorFlow's sensitivity minus the deployed IR's. Refused above
  `max_drop`. Sensitivity is the figure a missed blast costs.

Defaults, and why:
- min_agreement 0.98: a model whose decisions move on more than 1 image in 50 is a
  different model from the one evaluated. On test sets under 50 images it means no
  changed decision at all, which is the only reading a small set supports: one flip
  in 32 is already 3%.
- max_drop 0.02: at most one lost blast per 50 positives, the same budget as
  agreement spent entirely on the costly side. With fewer than 50 positives it again
  means none.

`--allow-degraded` exports anyway; the gate's figures and `overridden: true` go into
the manifest's provenance, and hub and node show the model as degraded.
"""

from __future__ import annotations

from pydantic import Field

from cellwatch.shared.base import Strict
from cellwatch.training.errors import GateError
from cellwatch.training.stats import MetricSet, Proportion

DEFAULT_MIN_AGREEMENT = 0.98
DEFAULT_MAX_DROP = 0.02
__all__ = ["DEFAULT_MAX_DROP", "DEFAULT_MIN_AGREEMENT", "Gate", "GateError", "judge"]


class Gate(Strict):
    """provenance.gate in the manifest."""

    min_agreement: float = Field(ge=0.0, le=1.0)
    max_drop: float = Field(ge=0.0, le=1.0)
    agreement: float | None
    sensitivity_drop: float | None = Field(description="TensorFlow minus deployed; null: no ALL")
    passed: bool
    overridden: bool = Field(description="exported although it failed (--allow-degraded)")

    def failures(self) -> list[str]:
        out = []
        if self.agreement is None or self.agreement < self.min_agreement:
            shown = "n/a" if self.agreement is None else f"{self.agreement:.3f}"
            out.append(
                f"top-1 agreement with TensorFlow {shown} < --min-agreement {self.min_agreement:g}"
            )
        if self.sensitivity_drop is not None and self.sensitivity_drop > self.max_drop + 1e-12:
            out.append(
                f"sensitivity drop {self.sensitivity_drop:.3f} > --max-drop {self.max_drop:g}"
            )
        return out


def judge(
    agreement: Proportion,
    tensorflow: MetricSet,
    deployed: MetricSet,
    *,
    min_agreement: float,
    max_drop: float,
) -> Gate:
    """The gate's verdict (not yet overridden)."""
    tf_sens, dep_sens = tensorflow.sensitivity.value, deployed.sensitivity.value
    drop = None if tf_sens is None or dep_sens is None else tf_sens - dep_sens
    gate = Gate(
        min_agreement=min_agreement,
        max_drop=max_drop,
        agreement=agreement.value,
        sensitivity_drop=drop,
        passed=True,
        overridden=False,
    )
    return gate.model_copy(update={"passed": not gate.failures()})
