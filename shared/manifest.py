"""The model bundle's manifest.json (`cellwatch.bundle/1`, DESIGN.md, Model bundle)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cellwatch.shared.base import Strict
from cellwatch.shared.drift import DriftReference
from cellwatch.shared.figures import BundleMetrics
from cellwatch.shared.provenance import MODEL_FLAGS, ModelFlag, Provenance, model_flags
from cellwatch.shared.schemas import ModelName, Sha256, Version

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MODEL_CARD_FILE = "MODEL_CARD.md"
PAYLOAD_FILES = ("model.xml", "model.bin", "golden.npz", MODEL_CARD_FILE)
"""The only files a manifest may list; a bundle is these plus manifest and signature."""
BUNDLE_FILES = (MANIFEST_FILE, SIGNATURE_FILE, *PAYLOAD_FILES)
__all__ = ["MODEL_FLAGS", "ModelFlag", "model_flags"]  # shared/provenance.py: the one rule


class InputSpec(Strict):
    name: str = Field("input", min_length=1, max_length=128)
    shape: tuple[int, int, int, int] = (1, 299, 299, 3)
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["f32"] = "f32"
    color: Literal["RGB"] = "RGB"
    range: tuple[float, float] = (-1.0, 1.0)

    @model_validator(mode="after")
    def _square_rgb(self) -> InputSpec:
        n, h, w, c = self.shape
        if n != 1 or c != 3 or h != w or not 16 <= h <= 2048:
            raise ValueError(
                f"input shape must be [1, S, S, 3] with 16 <= S <= 2048, got {self.shape}"
            )
        return self


class PreprocessingSpec(Strict):
    central_crop_fraction: float = Field(0.875, gt=0.0, le=1.0)
    resize: Literal["bilinear"] = "bilinear"
    size: int = Field(299, ge=16, le=2048)


class FileEntry(Strict):
    sha256: Sha256
    size: int = Field(ge=0)


class GoldenSpec(Strict):
    file: Literal["golden.npz"] = "golden.npz"
    tolerance: float = Field(gt=0.0, le=1.0, description="max |p - expected| per probability")
    inputs: str | None = Field(
        None, max_length=500, description="what the golden inputs are (no patient images)"
    )


class CalibrationCheck(Strict):
    """The shipped probabilities on the held-out eval split (test), beside the
    uncalibrated ones: calibration is judged where it was not fitted."""

    split: str = "test"
    n: int = Field(ge=0)
    ece: float = Field(ge=0.0, le=1.0, description="of the shipped probabilities")
    nll: float = Field(ge=0.0)
    brier: float = Field(ge=0.0, le=1.0)
    ece_uncalibrated: float = Field(ge=0.0, le=1.0)
    nll_uncalibrated: float = Field(ge=0.0)
    brier_uncalibrated: float = Field(ge=0.0, le=1.0)
    errors: int = Field(ge=0, description="wrong decisions at the bundle's threshold")
    errors_in_band: int = Field(ge=0, description="of them, inside the low-confidence band")
    errors_more_confident: int = Field(
        0, ge=0, description="errors whose shipped p is further from the threshold than T=1's"
    )


class Calibration(Strict):
    """Temperature scaling chosen on the validation split (training/calibration.py)."""

    temperature: float = Field(gt=0.0, description="logits are divided by it when applied")
    applied: bool = Field(description="false: kept the uncalibrated logits (see note)")
    ece_before: float | None = Field(None, ge=0.0, le=1.0, description="validation ECE, T = 1")
    ece_after: float | None = Field(None, ge=0.0, le=1.0, description="validation ECE, fitted T")
    brier: float | None = Field(
        None, ge=0.0, le=1.0, description="validation Brier score of the shipped logits"
    )
    nll_before: float | None = Field(None, ge=0.0, description="validation NLL, T = 1")
    nll_after: float | None = Field(None, ge=0.0, description="validation NLL, fitted T")
    cv_nll_before: float | None = Field(
        None, ge=0.0, description="cross-validated NLL on validation, T = 1"
    )
    cv_nll_after: float | None = Field(
        None, ge=0.0, description="cross-validated NLL on validation, T refit per fold"
    )
    rule: str | None = Field(None, max_length=500, description="when a temperature is applied")
    split: str = "val"
    n: int = Field(0, ge=0, description="images the temperature was fit on")
    note: str | None = None
    test: CalibrationCheck | None = None


class Decision(Strict):
    """How a node turns probabilities into a label (two-class bundles).

    `label` is positive_label when p(positive_label) >= threshold, otherwise the other
    label; the Result is `low_confidence` when lo <= p(positive_label) <= hi.
    """

    positive_label: str = Field(min_length=1)
    threshold: float = Field(gt=0.0, lt=1.0)
    low_confidence: tuple[float, float] = Field(description="[lo, hi] band of p(positive)")
    target: str = Field(
        min_length=1, max_length=200, description="what the threshold was chosen for"
    )

    @model_validator(mode="after")
    def _band_holds_threshold(self) -> Decision:
        lo, hi = self.low_confidence
        if not 0.0 <= lo <= self.threshold <= hi <= 1.0:
            raise ValueError(
                f"low_confidence band [{lo}, {hi}] must lie in [0, 1] and contain the "
                f"threshold {self.threshold}"
            )
        return self


class Manifest(Strict):
    schema_: Literal["cellwatch.bundle/1"] = Field("cellwatch.bundle/1", alias="schema")
    name: ModelName
    version: Version
    created_at: datetime
    labels: list[str] = Field(min_length=2, max_length=1000)
    input: InputSpec = Field(default_factory=InputSpec)
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)
    output: str = Field(min_length=1, max_length=256, description="name of the softmax output")
    precision: Literal["fp32", "fp16", "int8"]
    low_confidence_threshold: float = Field(0.6, ge=0.0, le=1.0)
    files: dict[str, FileEntry]
    metrics: BundleMetrics | dict[str, Any] = Field(
        default_factory=dict,
        union_mode="left_to_right",
        description="BundleMetrics (cellwatch-train); other tools' figures stay a mapping",
    )
    """BundleMetrics is tried first: pydantic's smart union would prefer the mapping as a
    closer match for JSON as soon as the figures hold a date or an enum key (the field
    evaluation does)."""
    provenance: Provenance = Field(default_factory=Provenance)
    golden: GoldenSpec | None = None
    calibration: Calibration | None = None
    decision: Decision | None = Field(
        None,
        description="threshold and low-confidence band; absent: argmax and "
        "low_confidence_threshold",
    )
    reference: DriftReference | None = Field(
        None,
        description="the deployed model's figures on the validation split, what nodes "
        "compare their live images with (shared/drift.py); absent in older bundles",
    )

    @property
    def flags(self) -> list[ModelFlag]:
        return self.provenance.flags

    @property
    def figures(self) -> BundleMetrics | None:
        """The deployed model's figures, when the bundle carries them in cellwatch's shape."""
        return self.metrics if isinstance(self.metrics, BundleMetrics) else None

    def metrics_json(self) -> dict[str, Any]:
        """metrics as JSON-ready data (how a database stores them)."""
        if isinstance(self.metrics, BundleMetrics):
            return self.metrics.model_dump(mode="json")
        return dict(self.metrics)

    def provenance_json(self) -> dict[str, Any]:
        """provenance as JSON-ready data, with only the fields the bundle carries."""
        data: dict[str, Any] = self.provenance.model_dump(mode="json", by_alias=True)
        return data

    @field_validator("files")
    @classmethod
    def _known_files(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        unknown = sorted(set(files) - set(PAYLOAD_FILES))
        if unknown:
            raise ValueError(f"files not allowed in a bundle: {unknown} (allowed: {PAYLOAD_FILES})")
        for required in ("model.xml", "model.bin"):
            if required not in files:
                raise ValueError(f"bundle must list {required}")
        return files

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.preprocessing.size != self.input.shape[1]:
            raise ValueError("preprocessing.size must equal the input's height and width")
        if self.golden is not None and self.golden.file not in self.files:
            raise ValueError(f"golden file {self.golden.file} is not listed in files")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.decision is not None and (
            len(self.labels) != 2 or self.decision.positive_label not in self.labels
        ):
            raise ValueError("decision needs two labels, one of them its positive_label")
        if self.reference is not None and (
            set(self.reference.labels) != set(self.labels)
            or self.reference.positive_label not in self.labels
        ):
            raise ValueError("reference must count the bundle's labels, one its positive_label")
        return self

    def to_json(self) -> bytes:
        return (self.model_dump_json(by_alias=True, indent=2) + "\n").encode()
