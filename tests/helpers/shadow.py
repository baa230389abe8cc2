"""Shadow phase and drift in the tests: synthetic smears (shifted or not), a toy bundle's
drift reference measured as export measures one, and answered images as the node's
observers receive them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import openvino as ov

from cellwatch.node.classifier import Classifier, decide
from cellwatch.node.decode import ImageLimits
from cellwatch.node.engine import EngineConfig, ServingModel, load_serving_model
from cellwatch.node.observers import Observation
from cellwatch.node.requests import ImageRequest
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.drift import DriftReference, reference_of
from cellwatch.shared.signing import TrustedKeys
from cellwatch.training.synth import Shift, encode, labels_for, smear

F32 = EngineConfig(force_f32=True, infer_requests=1, performance_hint="latency")
CLASSIFIER = Classifier("node-t", ImageLimits())


def smears(count: int, seed: int, shift: Shift = "none") -> list[bytes]:
    """count synthetic smears (TIFF bytes), both classes."""
    labels = labels_for(count, seed)
    return [encode(smear(label, seed, i, 257, shift), "tif") for i, label in enumerate(labels)]


def serving(bundle: Path, keys: Path) -> ServingModel:
    return load_serving_model(ov.Core(), load_bundle(bundle, TrustedKeys.load(keys)), F32)


def observation(model: ServingModel, payload: bytes, index: int = 0) -> Observation:
    """payload answered by model, as the pipeline hands it to the observers."""
    req = ImageRequest(
        payload=payload,
        image_id=f"img-{index}",
        source="client",
        received_at=datetime.now(UTC),
        received_mono=0.0,
    )
    pixels, width, height = CLASSIFIER.prepare(req, model)
    result = CLASSIFIER.ok_result(req, model, model.infer(pixels))
    return Observation(result, pixels, payload, width, height, model)


def reference(model: ServingModel, payloads: list[bytes]) -> DriftReference:
    """The drift reference of model on payloads, as export measures one."""
    obs = [observation(model, p, i) for i, p in enumerate(payloads)]
    manifest = model.bundle.manifest
    positive = manifest.labels.index("ALL")
    probs = np.array([o.model.infer(o.pixels) for o in obs])
    decided = [decide(manifest, p) for p in probs]
    return reference_of(
        positive_prob=probs[:, positive],
        labels=manifest.labels,
        predicted=np.array([d[0] for d in decided]),
        low=np.array([d[2] for d in decided]),
        megapixels=np.array([o.width * o.height / 1e6 for o in obs]),
        pixels=np.concatenate([o.pixels for o in obs]),
        positive_label="ALL",
    )
