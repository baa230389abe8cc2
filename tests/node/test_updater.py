"""The update agent without a broker: desired models and revocation lists driven
through its routes by hand-made messages (tests/edge.py), real bundles compiled on
OpenVINO, the reports recorded instead of published. test_updates.py and the hub's
tests show the same through the real broker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openvino as ov
import pytest

from cellwatch.node.engine import EngineConfig, ServingModel
from cellwatch.node.fetcher import Fetcher
from cellwatch.node.loader import BundleLoader
from cellwatch.node.store import BundleStore
from cellwatch.node.updater import UpdateAgent
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.revocations import sign_revocation
from cellwatch.shared.rpc import deliver
from cellwatch.shared.schemas import (
    DesiredModel,
    ModelError,
    ModelRef,
    RevocationList,
    UpdateReport,
    utcnow,
)
from cellwatch.shared.settings import MqttSettings
from cellwatch.shared.signing import TrustedKeys, load_private_key
from cellwatch.shared.states import UpdateState
from tests.edge import Acks, Recorder, message
from tests.harness import T, wait_for

NODE = "node-1"


@dataclass
class Served:
    model: ServingModel | None = None
    errors: list[ModelError | None] = field(default_factory=list)

    def activate(self, model: ServingModel, error: ModelError | None) -> None:
        self.model = model
        self.errors.append(error)

    def deactivate(self, error: ModelError) -> None:
        self.model = None
        self.errors.append(error)


@dataclass
class Rig:
    agent: UpdateAgent
    out: Recorder
    served: Served
    ref: ModelRef

    def reports(self) -> list[UpdateReport]:
        return [UpdateReport.model_validate_json(p.payload) for p in self.out.on(T.update(NODE))]

    def states(self) -> list[UpdateState]:
        return [r.state for r in self.reports()]


@pytest.fixture
def rig(toy_bundle: tuple[Path, Path], tmp_path: Path) -> Iterator[Rig]:
    bundle, keys = toy_bundle
    verified = load_bundle(bundle, TrustedKeys.load(keys))
    store = BundleStore(tmp_path / "store")
    store.import_dir(verified.manifest_sha256, bundle)  # activated before: no download
    # Never connected: the bundle is in the store, so nothing is fetched.
    fetcher = Fetcher(MqttClient(MqttSettings(), client_id="unused"), T, NODE)
    served = Served()
    out = Recorder()
    agent = UpdateAgent(
        publisher=out,
        topics=T,
        node_id=NODE,
        store=store,
        fetcher=fetcher,
        loader=BundleLoader(
            ov.Core(), TrustedKeys.load(keys), EngineConfig(), allow_unsigned=False, self_test=True
        ),
        current_sha=lambda: served.model.bundle.manifest_sha256 if served.model else None,
        activate=served.activate,
        deactivate=served.deactivate,
    )
    agent.start()
    yield Rig(agent, out, served, verified.ref)
    agent.stop(timeout=30)


def desired(ref: ModelRef, rollout: str = "r1") -> bytes:
    return DesiredModel(rollout_id=rollout, model=ref, issued_at=utcnow()).to_json()


def test_a_desired_bundle_in_the_store_is_verified_compiled_and_served(rig: Rig) -> None:
    desired_route, _ = rig.agent.routes()
    acks = Acks()
    deliver(desired_route, message(T.desired(NODE), desired(rig.ref), ack=acks), rig.out)
    assert acks.count == 1  # handed over to the agent's thread at once
    wait_for(lambda: UpdateState.ACTIVE in rig.states(), 120, "active")
    assert rig.states() == [
        UpdateState.PENDING,
        UpdateState.VERIFYING,
        UpdateState.ACTIVATING,
        UpdateState.ACTIVE,
    ]
    assert rig.served.model is not None and rig.served.model.bundle.ref == rig.ref
    # The broker resending the retained desired changes nothing; an active one again
    # is reported active at once.
    deliver(desired_route, message(T.desired(NODE), desired(rig.ref, "r2")), rig.out)
    wait_for(lambda: len(rig.reports()) == 5, 60, "the second report")
    assert rig.reports()[-1].rollout_id == "r2" and rig.states()[-1] is UpdateState.ACTIVE


def test_a_revoked_bundle_is_refused_and_bad_messages_are_dropped(
    rig: Rig, toy_bundle: tuple[Path, Path]
) -> None:
    desired_route, revoked_route = rig.agent.routes()
    key = load_private_key(toy_bundle[1] / "test.key")  # its signer's: a trusted key
    revocations = RevocationList(
        revoked=[sign_revocation(key, rig.ref, "test")], issued_at=utcnow()
    )
    deliver(revoked_route, message(T.hub_revoked(), revocations.to_json()), rig.out)
    wait_for(lambda: rig.ref.manifest_sha256 in rig.agent.revoked, what="the revocation")
    acks = Acks()
    for payload in (b"{not json", b"", b"x" * 20_000):  # malformed, cleared, too large
        deliver(desired_route, message(T.desired(NODE), payload, ack=acks), rig.out)
    deliver(desired_route, message(T.desired(NODE), desired(rig.ref), ack=acks), rig.out)
    wait_for(lambda: bool(rig.reports()), 60, "a report")
    (report,) = rig.reports()
    assert report.state is UpdateState.FAILED and report.error is not None
    assert report.error.code == "revoked" and acks.count == 4
    assert rig.served.model is None
