"""The node serves a real Inception V3 bundle exported by training, over MQTT.

The bundle comes from the shared tiny run (tests/training/conftest.py); the images
are the held-out test split, published as raw TIFF files like a lab client would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from cellwatch.node.decode import ImageLimits, decode_image
from cellwatch.node.engine import EngineConfig, load_serving_model
from cellwatch.node.preprocess import crop_and_resize
from cellwatch.node.service import NodeService
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.signing import TrustedKeys
from cellwatch.training.split import load_split
from tests.broker import Broker
from tests.harness import Requester
from tests.helpers.nodes import node_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def inception_node(
    broker: Broker, bundle: Callable[[str], Path], signing_key: Path
) -> Iterator[NodeService]:
    node = NodeService(node_settings(broker, (bundle("fp16"), signing_key.parent)))
    node.start()
    yield node
    node.join()


def test_node_serves_the_exported_inception_bundle(
    inception_node: NodeService,
    broker: Broker,
    split_dir: Path,
    bundle: Callable[[str], Path],
    signing_key: Path,
) -> None:
    model = inception_node.model
    assert model is not None and model.bundle.manifest.input.shape == (1, 299, 299, 3)
    split = load_split(split_dir)
    tests = split.entries("test")
    assert tests
    requester = Requester(broker.settings("client"))
    try:
        sent = {
            requester.send((split.root / e.path).read_bytes(), image_id=f"t{i}"): e
            for i, e in enumerate(tests)
        }
        # the same images classified locally with the same bundle (no MQTT)
        local = load_serving_model(
            ov.Core(),
            load_bundle(bundle("fp16"), TrustedKeys.load(signing_key.parent)),
            EngineConfig(performance_hint="latency", infer_requests=1),
        )
        for corr, entry in sent.items():
            r = requester.result(corr, timeout=120)
            assert r.status == "ok" and r.model == model.bundle.ref
            assert r.probabilities is not None and set(r.probabilities) == {"normal", "ALL"}
            rgb = decode_image((split.root / entry.path).read_bytes(), ImageLimits())
            expected = local.infer(crop_and_resize(rgb, model.bundle.manifest.preprocessing))
            got = np.array([r.probabilities["normal"], r.probabilities["ALL"]])
            assert np.allclose(got, expected, atol=1e-3), (entry.path, got, expected)
    finally:
        requester.close()
