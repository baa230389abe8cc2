"""The figures a bundle's manifest carries about its model (`manifest.metrics`), as types.

Training writes them (training/stats.py computes them, training/export.py measures
the deployed IR); the hub's page and CLI, the training CLI and the demo read them by
attribute. Every proportion carries its counts and Wilson 95% interval, ROC AUC a
bootstrap interval, so a reader can tell 32/32 (0.89-1.00) from 320/320 (0.99-1.00).

    {"split": "test", "n": 32, "split_fingerprint": "<sha>",
     "deployed": {"precision", "device", "inference_precision", "machine", "metrics": METRICSET},
     "f32": {"metrics": METRICSET}, "tensorflow": {"metrics": METRICSET},
     "agreement": PROPORTION,            # deployed decisions vs TensorFlow's, eval split
     "agreement_all": PROPORTION,        # the same on every image of train, val and test
     "parity": {"max_abs_diff_f32", "max_abs_diff_deployed"},
     "units": UNITS,                     # patient/smear-level figures (groups given)
     "field": FIELD}                     # labelled field samples per reason (export --field)

Bundles of the first training pass lack the newer fields (`agreement_all`, `units`,
`field`): they read as None. Bundles made by other tools carry other shapes; `Manifest.metrics`
keeps those as a plain mapping (shared/manifest.py).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

from pydantic import Field

from cellwatch.shared.base import Strict
from cellwatch.shared.samples import SampleReason

Z95 = 1.959963984540054
"""Two-sided 95% normal quantile."""
SplitName = Literal["train", "val", "test"]
Precision = Literal["fp32", "fp16", "int8"]


class Proportion(Strict):
    """k of n, with its Wilson 95% interval; value and interval null when n is 0."""

    value: float | None
    ci95: tuple[float, float] | None
    k: int = Field(ge=0)
    n: int = Field(ge=0)


def wilson(k: int, n: int, z: float = Z95) -> Proportion:
    """k successes of n trials with the Wilson score interval (training's figures, the
    hub's shadow agreement)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Proportion(value=None, ci95=None, k=0, n=0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Proportion(value=p, ci95=(lo, hi), k=k, n=n)


class Auc(Strict):
    """ROC AUC with a stratified percentile-bootstrap 95% interval (null with one class)."""

    value: float | None
    ci95: tuple[float, float] | None
    n: int = Field(ge=0)
    resamples: int = Field(ge=0)
    units: int | None = Field(
        None, description="groups (patients/smears) resampled; null: images were resampled"
    )


class MetricSet(Strict):
    """One model's figures on one split at one decision threshold (ALL positive)."""

    accuracy: Proportion
    sensitivity: Proportion = Field(description="TP / (TP + FN): blasts found")
    specificity: Proportion = Field(description="TN / (TN + FP); null with no negatives")
    precision: Proportion = Field(description="TP / (TP + FP): positive predictive value")
    npv: Proportion = Field(description="TN / (TN + FN): negative predictive value")
    roc_auc: Auc
    n: int = Field(ge=0)
    threshold: float = Field(ge=0.0, le=1.0, description="ALL when p_ALL >= threshold")
    confusion: list[list[int]] = Field(description="[[TN, FP], [FN, TP]]: rows true")


class Deployed(Strict):
    precision: Precision
    device: str
    inference_precision: str
    machine: str = Field(description="the CPU the figures were measured on")
    metrics: MetricSet


class Reference(Strict):
    metrics: MetricSet


class Parity(Strict):
    max_abs_diff_f32: float = Field(ge=0.0, description="max |p_IR(f32) - p_TensorFlow|")
    max_abs_diff_deployed: float = Field(ge=0.0, description="max |p_IR(deployed) - p_TF|")


class UnitFigures(Strict):
    """The deployed model's figures with the patient or smear as the unit.

    A unit is positive when any of its images is ALL, and its score is the highest
    p(ALL) among its images (a smear with one blast found is a smear flagged)."""

    unit: Literal["group"] = "group"
    units: int = Field(ge=0, description="patients/smears in the split")
    metrics: MetricSet


class FieldFigures(Strict):
    """A model's figures on one set of labelled field samples (shared/samples.py)."""

    n: int = Field(ge=0)
    sources: int = Field(ge=0, description="distinct sources among the samples")
    first: datetime | None = Field(None, description="earliest collected_at")
    last: datetime | None = Field(None, description="latest collected_at")
    metrics: MetricSet | None = Field(None, description="null when n is 0: no figures")


class FieldEvaluation(Strict):
    """`evaluate RUN --field DIR`: figures per reason and for all samples together. Only
    the `random` samples estimate field accuracy without bias (`note`)."""

    model: str = Field(description="what was evaluated, e.g. the run's TensorFlow checkpoint")
    directories: list[str] = Field(description="the field directories read")
    threshold: float = Field(ge=0.0, le=1.0, description="ALL when p_ALL >= threshold")
    per_reason: dict[SampleReason, FieldFigures]
    all: FieldFigures
    excluded: int = Field(
        0, ge=0, description="samples left out: (near-)copies of the run's train/val images"
    )
    note: str
    synthetic: bool = False
    created_at: datetime


class BundleMetrics(Strict):
    split: SplitName
    n: int = Field(ge=0)
    split_fingerprint: str
    deployed: Deployed
    f32: Reference
    tensorflow: Reference
    agreement: Proportion
    agreement_all: Proportion | None = Field(
        None, description="deployed vs TensorFlow decisions on every image (train, val, test)"
    )
    parity: Parity
    units: UnitFigures | None = Field(
        None, description="patient/smear-level figures; null when each file is its own group"
    )
    field: FieldEvaluation | None = Field(
        None, description="figures on labelled field samples (export --field); null: none run"
    )
