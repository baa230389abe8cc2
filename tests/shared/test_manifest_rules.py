"""The manifest's decision rule, model flags and model card, as readers check them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.errors import BundleError
from cellwatch.shared.manifest import Decision, Manifest, model_flags
from cellwatch.shared.signing import TrustedKeys
from tests.models import write_test_bundle

RULE = Decision(positive_label="ALL", threshold=0.3, low_confidence=(0.2, 0.5), target="t")


@pytest.mark.parametrize(
    ("threshold", "band"),
    [(0.3, (0.35, 0.5)), (0.3, (0.1, 0.25)), (0.3, (-0.1, 0.5)), (0.3, (0.2, 1.1))],
)
def test_band_must_hold_the_threshold(threshold: float, band: tuple[float, float]) -> None:
    with pytest.raises(ValidationError, match="contain the threshold"):
        Decision(positive_label="ALL", threshold=threshold, low_confidence=band, target="t")


def manifest(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "m",
        "version": "1",
        "created_at": "2024-01-01T00:00:00Z",
        "labels": ["normal", "ALL"],
        "output": "probabilities",
        "precision": "fp32",
        "files": {
            "model.xml": {"sha256": "0" * 64, "size": 1},
            "model.bin": {"sha256": "1" * 64, "size": 1},
        },
        "decision": RULE.model_dump(),
    }
    return {**base, **changes}


def test_decision_needs_its_label_and_two_classes() -> None:
    assert Manifest.model_validate(manifest()).decision == RULE
    for bad in (
        manifest(decision={**RULE.model_dump(), "positive_label": "blast"}),
        manifest(labels=["a", "b", "ALL"]),
    ):
        with pytest.raises(ValidationError, match="decision needs two labels"):
            Manifest.model_validate(bad)
    old = manifest()
    del old["decision"]
    assert Manifest.model_validate(old).decision is None  # bundles before the rule parse


@pytest.mark.parametrize(
    ("provenance", "flags"),
    [
        ({}, []),
        ({"builder": "x"}, []),
        ({"synthetic": False, "base_checkpoint": "/c/inception_v3.ckpt"}, []),
        ({"synthetic": True, "base_checkpoint": "/c/inception_v3.ckpt"}, ["synthetic"]),
        ({"synthetic": False, "base_checkpoint": None}, ["untrained"]),
        ({"base_checkpoint": "random-init"}, ["untrained"]),  # before the flag existed
        ({"gate": {"passed": True, "overridden": False}}, []),
        ({"gate": {"passed": False, "overridden": True}}, ["degraded"]),
        (
            {"synthetic": True, "base_checkpoint": None, "gate": {"passed": False}},
            ["synthetic", "untrained", "degraded"],
        ),
        ({"base_checkpoint": "/c/own.ckpt", "base_verified": False}, ["unverified-base"]),
        ({"base_checkpoint": "/c/inception_v3.ckpt", "base_verified": True}, []),
        ({"quality": {"passed": False, "overridden": True}}, ["no-skill"]),
        ({"gate": {"max_drop": 0.02, "passed": False}}, ["degraded"]),  # the older name
    ],
)
def test_model_flags(provenance: dict[str, Any], flags: list[str]) -> None:
    assert model_flags(provenance) == flags


def test_older_and_foreign_manifests_stay_readable() -> None:
    """Issue 16: metrics and provenance are typed; bundles of the first training pass and
    of other tools still parse, keep what they say, and are written back unchanged."""
    old_gate = {
        "min_agreement": 0.98,
        "max_drop": 0.02,
        "agreement": 1.0,
        "sensitivity_drop": 0.0,
        "passed": True,
        "overridden": False,
    }
    foreign = Manifest.model_validate(
        manifest(
            metrics={"evaluation": {"accuracy": 0.75, "n": 40}},
            provenance={"builder": "other-tool", "gate": old_gate},
        )
    )
    assert foreign.figures is None and foreign.metrics_json() == {
        "evaluation": {"accuracy": 0.75, "n": 40}
    }
    gate = foreign.provenance.gate
    assert gate is not None and gate.max_sensitivity_drop == 0.02 and gate.failures() == []
    assert foreign.provenance_json() == {"builder": "other-tool", "gate": old_gate}
    assert json.loads(foreign.to_json())["provenance"] == {
        "builder": "other-tool",
        "gate": old_gate,
    }
    assert foreign.flags == []  # nothing it did not say: no base_checkpoint key, no flag


def test_model_card_is_listed_hashed_and_verified(tmp_path: Path) -> None:
    bundle = write_test_bundle(tmp_path / "b", tmp_path / "keys", model_card="# card\n")
    keys = TrustedKeys.load(tmp_path / "keys")
    verified = load_bundle(bundle, keys)
    assert "MODEL_CARD.md" in verified.manifest.files
    (bundle / "MODEL_CARD.md").write_text("# a nicer card\n")
    with pytest.raises(BundleError, match=r"MODEL_CARD\.md"):
        load_bundle(bundle, keys)
    (bundle / "MODEL_CARD.md").write_text("# card\n")
    (bundle / "NOTES.md").write_text("not allowed")
    with pytest.raises(BundleError, match=r"unexpected entry 'NOTES\.md'"):
        load_bundle(bundle, keys)


def test_decision_survives_signing(tmp_path: Path) -> None:
    bundle = write_test_bundle(tmp_path / "b", tmp_path / "keys", decision=RULE)
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["decision"]["low_confidence"] == [0.2, 0.5]
    assert load_bundle(bundle, TrustedKeys.load(tmp_path / "keys")).manifest.decision == RULE
