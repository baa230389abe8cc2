"""The node labels with the bundle's decision rule (threshold, low-confidence band) and
shows the model's flags in its status; bundles without a rule keep argmax."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cellwatch.node.classifier import decide
from cellwatch.shared.manifest import Decision, Manifest
from cellwatch.shared.schemas import NodeStatus
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.models import write_test_bundle
from tests.node.conftest import NodeFactory

RULE = Decision(
    positive_label="ALL", threshold=0.3, low_confidence=(0.2, 0.5), target="sensitivity>=0.95"
)


def tinted(red: int) -> bytes:
    """A flat image; the toy model's p(ALL) rises with red: 100 -> 0.15, 120 -> 0.38,
    150 -> 0.80 (measured)."""
    bgr = np.zeros((64, 64, 3), np.uint8)
    bgr[..., 2], bgr[..., 1], bgr[..., 0] = red, 100, 128
    ok, png = cv2.imencode(".png", bgr)
    assert ok
    return png.tobytes()


def test_decide_uses_threshold_and_band_or_argmax() -> None:
    data = {
        "name": "m",
        "version": "1",
        "created_at": "2024-01-01T00:00:00Z",
        "labels": ["normal", "ALL"],
        "output": "p",
        "precision": "fp32",
        "low_confidence_threshold": 0.6,
        "files": {
            "model.xml": {"sha256": "0" * 64, "size": 1},
            "model.bin": {"sha256": "1" * 64, "size": 1},
        },
    }
    old = Manifest.model_validate(data)
    ruled = Manifest.model_validate({**data, "decision": RULE.model_dump()})
    cases = [
        (old, [0.62, 0.38], (0, 0.62, False)),  # argmax; 0.62 >= 0.6 is confident
        (ruled, [0.62, 0.38], (1, 0.38, True)),  # 0.38 >= 0.3, inside the band
        (ruled, [0.85, 0.15], (0, 0.85, False)),
        (ruled, [0.78, 0.22], (0, 0.78, True)),
        (ruled, [0.2, 0.8], (1, 0.8, False)),
    ]
    for manifest, probs, (idx, confidence, low) in cases:
        got = decide(manifest, np.array(probs, np.float32))
        assert got[0] == idx and got[2] is low, (probs, got)
        assert got[1] == pytest.approx(confidence)


def test_node_results_follow_the_rule_and_status_shows_flags(
    tmp_path: Path, broker: Broker, node_factory: NodeFactory, requester: Requester
) -> None:
    bundle = write_test_bundle(
        tmp_path / "b",
        tmp_path / "keys",
        decision=RULE,
        provenance={"synthetic": True, "base_checkpoint": None},
    )
    watch = Collector(broker.settings("hub"), T.node_filter("status"))
    try:
        node_factory(model={"bundle": bundle, "trusted_keys": tmp_path / "keys"})
        borderline = requester.request(tinted(120))
        assert borderline.status == "ok" and borderline.probabilities is not None
        assert 0.3 <= borderline.probabilities["ALL"] < 0.5
        assert borderline.label == "ALL" and borderline.class_index == 1
        assert borderline.confidence == pytest.approx(borderline.probabilities["ALL"])
        assert borderline.low_confidence is True
        assert borderline.flags == ["synthetic", "untrained"]  # every Result carries them
        clear = requester.request(tinted(100))
        assert clear.label == "normal" and clear.low_confidence is False
        wait_for(lambda: bool(watch.on(T.status("node-1"))), what="status")
        status = NodeStatus.model_validate_json(watch.on(T.status("node-1"))[-1].payload)
        assert status.model_flags == ["synthetic", "untrained"]
    finally:
        watch.close()


def test_old_bundles_keep_argmax(node_factory: NodeFactory, requester: Requester) -> None:
    node_factory()  # the toy bundle has no decision rule
    r = requester.request(tinted(120))
    assert r.label == "normal" and r.low_confidence is False  # p(normal) 0.62 >= 0.6
    assert r.flags == []  # an unflagged model: no flags, and none on the wire
    assert b'"flags"' not in r.to_json()
