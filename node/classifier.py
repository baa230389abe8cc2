"""From an ImageRequest to a Result: decode, preprocess, build the answer.

Used by both the MQTT service (inference on the async queue) and the local
`cellwatch-node classify` command (synchronous inference), so both print the same
Result JSON for the same image.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from cellwatch.node.decode import ImageLimits, decode
from cellwatch.node.engine import ServingModel
from cellwatch.node.preprocess import crop_and_resize
from cellwatch.node.requests import ImageRequest
from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.manifest import Manifest
from cellwatch.shared.schemas import ErrorInfo, Result, Timings, utcnow


def decide(manifest: Manifest, probs: np.ndarray) -> tuple[int, float, bool]:
    """(class index, its probability, low_confidence) under the bundle's decision rule.

    With a `decision` in the manifest: the positive label when its probability reaches
    the threshold (which may be below 0.5: the reported confidence is then below 0.5
    too), low confidence inside the [lo, hi] band. Without one (older bundles): argmax,
    low confidence below low_confidence_threshold.
    """
    rule = manifest.decision
    if rule is None:
        idx = int(np.argmax(probs))
        confidence = float(np.clip(probs[idx], 0.0, 1.0))
        return idx, confidence, confidence < manifest.low_confidence_threshold
    positive = manifest.labels.index(rule.positive_label)
    p = float(np.clip(probs[positive], 0.0, 1.0))
    idx = positive if p >= rule.threshold else 1 - positive
    lo, hi = rule.low_confidence
    return idx, float(np.clip(probs[idx], 0.0, 1.0)), lo <= p <= hi


class Prepared(NamedTuple):
    pixels: np.ndarray
    """The model's uint8 input (1, S, S, 3)."""
    width: int
    height: int
    """The image's own size (its header's)."""


class Classifier:
    def __init__(self, node_id: str, limits: ImageLimits) -> None:
        self.node_id = node_id
        self.limits = limits

    def prepare(self, req: ImageRequest, model: ServingModel) -> Prepared:
        """Decode, crop and resize req's payload to the model's uint8 input (ImageError
        if it cannot be used); the model converts the pixels to its range itself."""
        t0 = time.monotonic()
        req.timings["queue"] = (t0 - req.received_mono) * 1000.0
        spec = model.bundle.manifest.preprocessing
        rgb, head = decode(req.payload, self.limits, spec.size)
        t1 = time.monotonic()
        x = crop_and_resize(rgb, spec)
        t2 = time.monotonic()
        req.timings["decode"] = (t1 - t0) * 1000.0
        req.timings["preprocess"] = (t2 - t1) * 1000.0
        req.timings["infer_start"] = t2
        return Prepared(x, head.width, head.height)

    def ok_result(self, req: ImageRequest, model: ServingModel, probs: np.ndarray) -> Result:
        now = time.monotonic()
        infer_ms = (now - req.timings.get("infer_start", now)) * 1000.0
        idx, confidence, low = decide(model.bundle.manifest, probs)
        return Result(
            status="ok",
            image_id=req.image_id,
            source=req.source,
            scope=req.scope,
            node_id=self.node_id,
            model=model.bundle.ref,
            label=model.labels[idx],
            class_index=idx,
            confidence=confidence,
            probabilities={
                label: float(np.clip(p, 0.0, 1.0))
                for label, p in zip(model.labels, probs, strict=True)
            },
            low_confidence=low,
            timings_ms=self._timings(req, infer_ms),
            received_at=req.received_at,
            completed_at=utcnow(),
            flags=model.flags,
        )

    def error_result(
        self, req: ImageRequest, code: ErrorCode, message: str, model: ServingModel | None
    ) -> Result:
        return Result(
            status="error",
            image_id=req.image_id,
            source=req.source,
            scope=req.scope,
            node_id=self.node_id,
            model=model.bundle.ref if model is not None else None,
            timings_ms=self._timings(req, 0.0),
            received_at=req.received_at,
            completed_at=utcnow(),
            error=ErrorInfo(code=code, message=message[:500]),
        )

    @staticmethod
    def _timings(req: ImageRequest, infer_ms: float) -> Timings:
        return Timings(
            queue=round(req.timings.get("queue", 0.0), 3),
            decode=round(req.timings.get("decode", 0.0), 3),
            preprocess=round(req.timings.get("preprocess", 0.0), 3),
            infer=round(infer_ms, 3),
            total=round(req.elapsed_ms(), 3),
        )
