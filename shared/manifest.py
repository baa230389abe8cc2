"""The model bundle's manifest.json (`cellwatch.bundle/1`, DESIGN.md, Model bundle)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cellwatch.shared.base import Strict
from cellwatch.shared.schemas import ModelName, Sha256, Version

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MODEL_CARD_FILE = "MODEL_CARD.md"
PAYLOAD_FILES = ("model.xml", "model.bin", "golden.npz", MODEL_CARD_FILE)
"""The only files a manifest may list; a bundle is these plus manifest and signature."""
BUNDLE_FILES = (MANIFEST_FILE, SIGNATURE_FILE, *PAYLOAD_FILES)
ModelFlag = Literal["synthetic", "untrained", "degraded"]
MODEL_FLAGS: tuple[ModelFlag, ...] = ("synthetic", "untrained", "degraded")
"""What a model's provenance may warn about (`model_flags`): trained on SYNTHETIC data;
trained from a random initialisation (no base checkpoint); exported although its
deployed precision failed the quantisation gate (`--allow-degraded`)."""


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


class Calibration(Strict):
    """Temperature scaling fit on the validation split (training/calibration.py)."""

    temperature: float = Field(gt=0.0, description="logits are divided by it when applied")
    applied: bool = Field(description="false: kept the uncalibrated logits (see note)")
    ece_before: float | None = Field(None, ge=0.0, le=1.0, description="validation ECE, T = 1")
    ece_after: float | None = Field(None, ge=0.0, le=1.0, description="validation ECE, fitted T")
    brier: float | None = Field(
        None, ge=0.0, le=1.0, description="validation Brier score of the shipped logits"
    )
    split: str = "val"
    n: int = Field(0, ge=0, description="images the temperature was fit on")
    note: str | None = None


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


def model_flags(provenance: Mapping[str, Any]) -> list[ModelFlag]:
    """The warnings a manifest's provenance carries, in MODEL_FLAGS order.

    Bundles that do not say (made by other tools: no `synthetic`, `base_checkpoint`
    or `gate` keys) get no flag; `base_checkpoint` null (or the legacy "random-init")
    means trained from random weights.
    """
    flags: list[ModelFlag] = []
    if provenance.get("synthetic") is True:
        flags.append("synthetic")
    if "base_checkpoint" in provenance and provenance["base_checkpoint"] in (None, "random-init"):
        flags.append("untrained")
    gate = provenance.get("gate")
    if isinstance(gate, Mapping) and (gate.get("passed") is False or gate.get("overridden")):
        flags.append("degraded")
    return flags


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
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    golden: GoldenSpec | None = None
    calibration: Calibration | None = None
    decision: Decision | None = Field(
        None,
        description="threshold and low-confidence band; absent: argmax and "
        "low_confidence_threshold",
    )

    @property
    def flags(self) -> list[ModelFlag]:
        return model_flags(self.provenance)

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
        return self

    def to_json(self) -> bytes:
        return (self.model_dump_json(by_alias=True, indent=2) + "\n").encode()
