"""A bundle's `manifest.provenance`, as types: how the model was made, and its flags.

Training writes every field (training/export.py). Readers (the hub, the node, the
training CLI, the demo) use attributes. Bundles of older versions and other tools
may lack any field or carry others: every field is optional and unknown ones are
kept (`Lenient`), so their manifests stay readable; a missing field never raises a
flag, since a reader cannot tell what an older tool did not say.

The flags (MODEL_FLAGS), derived here and nowhere else (`model_flags`):
- synthetic: trained on SYNTHETIC images (`synthetic: true`);
- untrained: the base network started from random weights (`base_checkpoint` null,
  or the legacy "random-init");
- unverified-base: a base checkpoint whose SHA-256 is not the published TF-Slim
  file's (`base_verified: false`), exported with --base-is (what the user said it is);
- no-skill: the quality floor found no evidence of skill (`quality.passed: false`),
  exported with --allow-no-skill;
- degraded: the deployed precision failed the fidelity gate (`gate.passed: false` or
  `gate.overridden`), exported with --allow-degraded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field

from cellwatch.shared.base import Lenient
from cellwatch.shared.figures import MetricSet

ModelFlag = Literal["synthetic", "untrained", "unverified-base", "no-skill", "degraded"]
MODEL_FLAGS: tuple[ModelFlag, ...] = (
    "synthetic",
    "untrained",
    "unverified-base",
    "no-skill",
    "degraded",
)
LEGACY_RANDOM_INIT = "random-init"


class Gate(Lenient):
    """The fidelity gate: is the deployed IR still the model TensorFlow measured?

    Paired comparisons on the same images, so every difference is one the conversion
    made: decisions equal to TensorFlow's (`agreement`, on every image of train, val
    and test: it needs no labels), sensitivity lost on the labelled eval split
    (`sensitivity_drop`), and the largest change of a probability (`max_prob_diff`).
    """

    min_agreement: float | None = Field(None, ge=0.0, le=1.0)
    max_sensitivity_drop: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("max_sensitivity_drop", "max_drop"),
        serialization_alias="max_drop",
        description="written `max_drop` (its first name), which readers before it expect",
    )
    max_prob_diff_limit: float | None = Field(
        None, ge=0.0, le=1.0, description="largest |p_deployed - p_TensorFlow| allowed"
    )
    agreement: float | None = None
    agreement_n: int | None = Field(None, ge=0, description="images the agreement is over")
    sensitivity_drop: float | None = Field(None, description="TensorFlow minus deployed")
    max_prob_diff: float | None = Field(None, ge=0.0, description="over every image measured")
    passed: bool | None = None
    overridden: bool = Field(False, description="exported although it failed (--allow-degraded)")

    def failures(self) -> list[str]:
        """Why the gate fails, one phrase per figure (empty: it passes)."""
        out = []
        if self.min_agreement is not None and (
            self.agreement is None or self.agreement < self.min_agreement
        ):
            shown = "n/a" if self.agreement is None else f"{self.agreement:.3f}"
            out.append(
                f"top-1 agreement with TensorFlow {shown} < --min-agreement {self.min_agreement:g}"
            )
        drop, limit = self.sensitivity_drop, self.max_sensitivity_drop
        if drop is not None and limit is not None and drop > limit + 1e-12:
            out.append(f"sensitivity drop {drop:.3f} > --max-sensitivity-drop {limit:g}")
        diff, diff_limit = self.max_prob_diff, self.max_prob_diff_limit
        if diff is not None and diff_limit is not None and diff > diff_limit:
            out.append(f"max |p difference| {diff:.3g} > --max-prob-diff {diff_limit:g}")
        return out


class Attempt(Lenient):
    """One int8 quantisation tried by export."""

    method: str
    split: str | None = Field(None, description="the images the method was judged on")
    agreement: float | None = None
    agreement_k: int | None = None
    n: int | None = None
    sensitivity_drop: float | None = None
    max_prob_diff: float | None = None
    deployed: MetricSet | None = None
    passed: bool | None = None
    seconds: float | None = None


class Quantization(Lenient):
    method: str | None = None
    int8_method: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)


class QualityFloor(Lenient):
    """Evidence of skill on the labelled eval split: the ROC AUC's lower 95% bound above
    0.5, and a Brier score better than the prior's (the training prevalence for every
    image) with the paired bootstrap's lower bound of the improvement above 0."""

    split: str | None = None
    n: int | None = None
    auc_ci_low: float | None = None
    brier: float | None = None
    prior_brier: float | None = None
    brier_gain_ci95: tuple[float, float] | None = None
    passed: bool | None = None
    overridden: bool = Field(False, description="exported although it failed (--allow-no-skill)")
    reasons: list[str] = Field(default_factory=list)


class Provenance(Lenient):
    synthetic: bool | None = None
    base_checkpoint: str | None = Field(None, description="path; null: random initialisation")
    base_checkpoint_sha256: str | None = None
    base_verified: bool | None = Field(
        None, description="the checkpoint's SHA-256 is a published TF-Slim file's"
    )
    base_published: str | None = Field(None, description="which published file it matched")
    base_claim: str | None = Field(None, description="what the user said it is (--base-is)")
    depth_multiplier: float | None = Field(None, gt=0.0, le=1.0)
    allow_untrained: bool | None = None
    allow_no_test: bool | None = None
    allow_no_skill: bool | None = None
    data_fingerprint: str | None = None
    split_fingerprints: dict[str, str] | None = None
    data_layout: str | None = None
    grouping: str | None = None
    near_duplicates: int | None = None
    split_seed: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    fold: int | None = None
    mode: str | None = None
    trainable_scopes: list[str] | None = None
    epochs: int | None = None
    selected_epoch: int | None = None
    selection: str | None = None
    steps: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    lr_schedule: str | None = None
    checkpoint: str | None = None
    frozen_pb_sha256: str | None = None
    calibration_images: int | None = None
    test_reads: int | None = None
    code_commit: str | None = Field(None, description="git commit of the training code")
    training_versions: dict[str, str] | None = None
    export_versions: dict[str, str] | None = None
    run: str | None = None
    gate: Gate | None = None
    quality: QualityFloor | None = None
    quantization: Quantization | None = None

    @property
    def flags(self) -> list[ModelFlag]:
        """The warnings this provenance carries, in MODEL_FLAGS order (see the module)."""
        flags: list[ModelFlag] = []
        if self.synthetic is True:
            flags.append("synthetic")
        if "base_checkpoint" in self.model_fields_set and self.base_checkpoint in (
            None,
            LEGACY_RANDOM_INIT,
        ):
            flags.append("untrained")
        elif self.base_verified is False:
            flags.append("unverified-base")
        if self.quality is not None and (self.quality.passed is False or self.quality.overridden):
            flags.append("no-skill")
        if self.gate is not None and (self.gate.passed is False or self.gate.overridden):
            flags.append("degraded")
        return flags


def model_flags(provenance: Provenance | dict[str, object]) -> list[ModelFlag]:
    """The flags of a provenance, typed or as stored (a dict from a database or JSON)."""
    if not isinstance(provenance, Provenance):
        provenance = Provenance.model_validate(provenance)
    return provenance.flags
