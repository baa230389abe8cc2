"""Drift: what a bundle's live images are compared with, and what a node reports.

Export measures a **reference** on the validation split with the deployed model (the
IR as shipped) and writes it into the manifest (`Manifest.reference`); every node keeps
the same figures over a rolling window of its live images and sends them in its
telemetry (`Telemetry.drift`, node/drift.py computes the statistics). The signals:

- `confidence`: the calibrated p(positive label) (p(ALL)), in fixed bins of 0.1;
- `labels`: the predicted-class shares;
- `low_confidence`: the share inside the bundle's low-confidence band;
- `size`: the image's size (megapixels, from its header);
- `color`: the mean of each channel of the model's input pixels (the central crop
  resized, 0..255), each in bins (the signal is the channel that moved most);
- `sharpness`: the variance of the Laplacian of that input's grey (`input_statistics`).

Counts, not shares, travel (a reference of 24 validation images and one of 24,000 are
not the same evidence: the node's test uses both counts). Bins of the continuous input
figures are cut at the reference's quantiles (`quantile_cuts`), so each holds about
the same number of reference images.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Literal

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from cellwatch.shared.base import Strict
from cellwatch.shared.states import DriftState

CONFIDENCE_CUTS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Interior edges of the confidence histogram: ten bins of 0.1 (a bin holds p with
cuts[i-1] <= p < cuts[i])."""
MIN_PER_BIN = 10
"""Reference images per bin of an input figure at least (twice the chi-square test's
usual 5 expected counts: the cuts are the reference's own quantiles, whose noise
grows as bins shrink); at most MAX_BINS bins, at least 2."""
MAX_BINS = 10
SHARPNESS_STRIDE = 2
"""input_statistics reads every second pixel of each row and column: a quarter of the
work (the node computes it for every image), the same on both sides."""
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)
"""ITU-R BT.601 luma of R, G, B."""

Count = Annotated[int, Field(ge=0, le=2**53)]


class DriftSignal(StrEnum):
    CONFIDENCE = "confidence"
    LABELS = "labels"
    LOW_CONFIDENCE = "low_confidence"
    SIZE = "size"
    COLOR = "color"
    SHARPNESS = "sharpness"


class Bins(Strict):
    """A histogram: `counts[i]` values fell in bin i, bin i holding cuts[i-1] <= v <
    cuts[i] (the first and last bins are open)."""

    cuts: list[float] = Field(max_length=MAX_BINS - 1)
    counts: list[Count] = Field(max_length=MAX_BINS)

    @model_validator(mode="after")
    def _shape(self) -> Bins:
        if len(self.counts) != len(self.cuts) + 1:
            raise ValueError(f"{len(self.cuts)} cuts need {len(self.cuts) + 1} counts")
        if any(b <= a for a, b in zip(self.cuts, self.cuts[1:], strict=False)):
            raise ValueError("cuts must increase")
        return self

    @property
    def n(self) -> int:
        return sum(self.counts)


class DriftReference(Strict):
    """The deployed model's figures on one split (validation), as export measured them."""

    model_config = ConfigDict(allow_inf_nan=False)

    split: Literal["val", "test"] = "val"
    n: int = Field(ge=1, description="images measured")
    positive_label: str = Field(min_length=1)
    confidence: Bins = Field(description="calibrated p(positive label), CONFIDENCE_CUTS")
    labels: dict[str, Count] = Field(description="images per predicted label")
    low_confidence: Count = Field(description="images inside the low-confidence band")
    size: Bins = Field(description="megapixels of the image (its header's width x height)")
    color: list[Bins] = Field(min_length=3, max_length=3, description="R, G, B input means")
    sharpness: Bins = Field(description="variance of the Laplacian of the input's grey")


class SignalDrift(Strict):
    """One signal of a node's live window against its bundle's reference."""

    model_config = ConfigDict(allow_inf_nan=False)

    state: DriftState
    psi: float | None = Field(None, ge=0.0, le=1e6, description="population stability index")
    p_value: float | None = Field(
        None, ge=0.0, le=1.0, description="chi-square test of homogeneity, live vs reference"
    )


class AccuracyEstimate(Strict):
    """Accuracy without labels: the mean calibrated probability of the label given
    (confidence-based performance estimation), over the node's window."""

    model_config = ConfigDict(allow_inf_nan=False)

    value: float = Field(ge=0.0, le=1.0)
    ci95: tuple[float, float] = Field(
        description="sampling interval only (the estimate also rests on calibration)"
    )
    n: int = Field(ge=1)
    supported: bool = Field(
        description="the bundle's calibration is good enough to support the estimate"
    )
    note: str | None = Field(None, max_length=300, description="why it is not, in words")


class DriftFigures(Strict):
    """A node's drift figures (`Telemetry.drift`): its last `n` live images (a rolling
    window of at most `window`, since its model was loaded) against the reference, and
    since-start counts for /metrics."""

    model_config = ConfigDict(allow_inf_nan=False)

    window: int = Field(ge=1, description="images the rolling window holds at most")
    n: int = Field(ge=0, description="images in it now")
    state: DriftState = Field(description="the worst signal's state")
    reference_n: int | None = Field(None, description="images of the reference (None: none)")
    confidence: list[Count] = Field(
        max_length=len(CONFIDENCE_CUTS) + 1, description="window: p(positive label) per bin"
    )
    labels: dict[str, Count] = Field(max_length=64, description="window: images per label")
    low_confidence: Count = Field(description="window: images in the low-confidence band")
    signals: dict[DriftSignal, SignalDrift] = Field(default_factory=dict)
    accuracy: AccuracyEstimate | None = None
    total_confidence: list[Count] = Field(
        max_length=len(CONFIDENCE_CUTS) + 1, description="since start: p(positive) per bin"
    )
    total_confidence_sum: float = Field(ge=0.0, description="since start: sum of p(positive)")
    total_labels: dict[str, Count] = Field(
        max_length=64, description="since start: images per label"
    )
    dropped: Count = Field(0, description="since start: live images not looked at (busy)")


# -- figures both sides compute -----------------------------------------------------------


def input_statistics(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """(mean R, mean G, mean B, sharpness) of the model's input pixels: uint8 (or float
    0..255) (S, S, 3), with or without a batch axis of one. Sharpness is the variance of
    the 4-neighbour Laplacian of the grey image, every SHARPNESS_STRIDE-th pixel."""
    rgb = np.asarray(pixels).reshape(pixels.shape[-3:])
    s = SHARPNESS_STRIDE
    sub = rgb[::s, ::s].astype(np.float32)
    means = sub.reshape(-1, 3).mean(axis=0)
    grey = sub @ GREY_WEIGHTS
    lap = (
        4.0 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    )
    return float(means[0]), float(means[1]), float(means[2]), float(lap.var())


def bin_index(cuts: Sequence[float], values: np.ndarray) -> np.ndarray:
    """The bin of each value (see Bins)."""
    return np.searchsorted(np.asarray(cuts, np.float64), values, side="right")


def histogram(cuts: Sequence[float], values: np.ndarray) -> list[int]:
    counts = np.bincount(bin_index(cuts, np.asarray(values, np.float64)), minlength=len(cuts) + 1)
    return [int(c) for c in counts]


def quantile_cuts(values: np.ndarray) -> list[float]:
    """Cuts at the values' quantiles: about the same number per bin, at least
    MIN_PER_BIN (2 to MAX_BINS bins). When the values barely vary (every image the same
    size), the cuts hug the value, so that any other value falls in a bin of its own."""
    v = np.asarray(values, np.float64)
    bins = int(min(MAX_BINS, max(2, len(v) // MIN_PER_BIN)))
    qs = np.quantile(v, np.arange(1, bins) / bins)
    cuts = sorted({round(float(q), 6) for q in qs})
    lo, hi = float(v.min()), float(v.max())
    inner = [c for c in cuts if lo < c <= hi]
    if inner:
        return inner
    delta = max(abs(lo) * 0.01, 1e-6)
    return [round(lo - delta, 6), round(hi + delta, 6)]


def reference_of(
    *,
    positive_prob: np.ndarray,
    labels: Sequence[str],
    predicted: np.ndarray,
    low: np.ndarray,
    megapixels: np.ndarray,
    pixels: np.ndarray,
    positive_label: str,
    split: Literal["val", "test"] = "val",
) -> DriftReference:
    """The reference from one split's images: the deployed model's p(positive), its
    decisions (class indices) and low-confidence flags, the images' megapixels, and
    the model's input pixels (N, S, S, 3, 0..255)."""
    stats = np.array([input_statistics(p) for p in pixels], np.float64).reshape(-1, 4)

    def binned(values: np.ndarray) -> Bins:
        cuts = quantile_cuts(values)
        return Bins(cuts=cuts, counts=histogram(cuts, values))

    counts = np.bincount(np.asarray(predicted, np.int64), minlength=len(labels))
    return DriftReference(
        split=split,
        n=len(positive_prob),
        positive_label=positive_label,
        confidence=Bins(
            cuts=list(CONFIDENCE_CUTS), counts=histogram(CONFIDENCE_CUTS, positive_prob)
        ),
        labels={label: int(c) for label, c in zip(labels, counts, strict=True)},
        low_confidence=int(np.sum(low)),
        size=binned(megapixels),
        color=[binned(stats[:, i]) for i in range(3)],
        sharpness=binned(stats[:, 3]),
    )
