"""Revocation is final: revoked with a signed revocation, a model never comes back on
a node: not after the hub is restored from an older backup (which knew nothing of the
revocation: it learns it again from the broker's retained list before it publishes its
own, refuses to roll the model out and hands out none of its files), not when an
impostor with the hub's broker password sends the node a desired model naming it or
publishes revocation lists of its own, and not after the node restarts
(deploy/PRODUCTION.md, threat model)."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import ApiFailure
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.mqtt import PublishProps
from cellwatch.shared.revocations import sign_revocation
from cellwatch.shared.schemas import (
    DesiredModel,
    FetchRequest,
    ModelRef,
    NodeStatus,
    Result,
    RevocationList,
    UpdateReport,
)
from cellwatch.shared.signing import TrustedKeys, generate_keypair, load_private_key
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.security.stack import BIN, Process, Stack


def ref(bundle: Path, keys: Path) -> ModelRef:
    b = load_bundle(bundle, TrustedKeys.load(keys))
    m = b.manifest
    return ModelRef(name=m.name, version=m.version, manifest_sha256=b.manifest_sha256)


class Watch:
    """node-1's statuses, desired models and update reports, as they come."""

    def __init__(self, broker: Broker) -> None:
        self.status = Collector(broker.settings("operator"), T.status("node-1"), name="st")
        self.reports = Collector(broker.settings("hub"), T.update("node-1"), name="up")

    def serving(self, since: int = 0) -> str | None:
        """The model of node-1's last online status among those after the first `since`."""
        statuses = [NodeStatus.model_validate_json(m.payload) for m in self.status.messages]
        online = [s for s in statuses[since:] if s.state == "online"]
        return online[-1].model.version if online and online[-1].model else None

    def wait_serving(self, version: str, since: int = 0) -> None:
        wait_for(lambda: self.serving(since) == version, 120, f"node-1 serving {version}")

    def refused(self, rollout_id: str) -> bool:
        reports = [UpdateReport.model_validate_json(m.payload) for m in self.reports.messages]
        return any(
            r.rollout_id == rollout_id
            and r.state == "failed"
            and r.error is not None
            and r.error.code == "revoked"
            for r in reports
        )

    def close(self) -> None:
        self.status.close()
        self.reports.close()


def fetch_error(broker: Broker, model: ModelRef) -> str | None:
    """What the hub answers node-1 asking for the manifest of `model`: the error code of
    its answer (None: it sent the file)."""
    box = Collector(broker.settings("node-1"), T.fetch_reply("node-1"), name="fetch")
    asker = broker.connect("node-1")
    req = FetchRequest(
        manifest_sha256=model.manifest_sha256, file="manifest.json", offset=0, length=4096
    )
    props = PublishProps(response_topic=T.fetch_reply("node-1"), correlation_data=b"probe")
    try:
        assert asker.publish_wait(T.hub_fetch("node-1"), req.to_json(), props=props)
        wait_for(lambda: any(m.correlation == b"probe" for m in box.messages), 30, "an answer")
        (answer,) = [m for m in box.messages if m.correlation == b"probe"]
        return answer.user.get("error")
    finally:
        box.close()


def retained_lists(broker: Broker, model: ModelRef) -> bool:
    """Whether the retained revocation list on the broker revokes `model`."""
    box = Collector(broker.settings("node-2"), T.hub_revoked(), name="retained")
    try:
        wait_for(lambda: bool(box.messages), 30, "the retained revocation list")
        last = RevocationList.model_validate_json(box.messages[-1].payload)
        return model.manifest_sha256 in last.shas()
    finally:
        box.close()


def revocation_refused(node: Process, why: str) -> bool:
    """Whether node-1's log has a refusal of a revocation of toy 1.0.0 for `why`."""
    lines = node.text().splitlines()
    return any("revocation of toy 1.0.0" in line and why in line for line in lines)


def wait_desired(broker: Broker, version: str) -> None:
    """Until node-1's retained desired model names version."""
    box = Collector(broker.settings("node-1"), T.desired("node-1"), name="desired")

    def named() -> bool:
        last = box.messages[-1:] if box.messages else []
        return any(
            DesiredModel.model_validate_json(m.payload).model.version == version for m in last
        )

    try:
        wait_for(named, 60, f"the retained desired model naming {version}")
    finally:
        box.close()


def test_a_revoked_model_never_comes_back(
    stack: Stack, lab_broker: Broker, signed_bundles: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    v1, v2, keys = signed_bundles
    v2_ref = ref(v2, keys)
    data = tmp_path / "hub-data"
    hub = stack.hub(data)
    node = stack.node("node-1", store_dir=tmp_path / "node-store")
    watch = Watch(lab_broker)
    hub.start()
    node.start()
    watch.wait_serving("1.0.0")
    operator = HubClient(lab_broker.settings("operator"), timeout_s=30)
    operator.connect()
    operator.push(v1)
    operator.push(v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    watch.wait_serving("2.0.0")
    wait_for(lambda: operator.rollout_status(rid).state == "completed", 60, "rollout done")
    operator.close()

    # The backup a restore would bring back: taken while 2.0.0 was the model.
    assert hub.stop() == 0
    backup = tmp_path / "backup"
    shutil.copytree(data, backup)
    hub.start()

    # The emergency path as documented: the operator's config from the environment.
    env = {
        **os.environ,
        "CELLWATCH_HUB_CLIENT_CONFIG": str(stack.operator_config()),
        "CELLWATCH_SIGN_KEY": str(keys / "test.key"),
    }
    r = subprocess.run(
        [str(BIN / "cellwatch-hub"), "models", "revoke", "toy", "2.0.0", "--reason", "bad"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "revoked toy 2.0.0" in r.stdout and "node-1" in r.stdout
    watch.wait_serving("1.0.0")
    since = len(watch.status.messages)
    # The retained desired model no longer names the revoked bundle.
    wait_desired(lab_broker, "1.0.0")

    # The hub is restored from the older backup: it knows nothing of the revocation,
    # but learns it from the broker's retained list before it publishes its own.
    assert hub.stop() == 0
    restored = stack.hub(tmp_path / "restored", name="restored-hub")
    shutil.copytree(backup, tmp_path / "restored")
    restored.start()
    operator = HubClient(lab_broker.settings("operator"), timeout_s=30)
    operator.connect()

    def relearnt() -> bool:
        return any(m.version == "2.0.0" and m.revoked_at for m in operator.models().models)

    wait_for(relearnt, 60, "the restored hub learning the revocation")
    with pytest.raises(ApiFailure) as refused:
        operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0"))
    assert refused.value.code == "revoked"
    operator.close()
    # Nor does it hand out any file of the revoked bundle, and its list leaves out nothing.
    assert fetch_error(lab_broker, v2_ref) == "revoked"
    wait_desired(lab_broker, "1.0.0")
    assert "leaves out" not in node.text()

    # An impostor with the hub's broker password (the hub stopped: the node alone must
    # refuse): a desired model naming the revoked bundle, then revocation lists of its
    # own.
    assert restored.stop() == 0
    impostor = lab_broker.connect("hub")
    desired = DesiredModel(rollout_id="impostor", model=v2_ref, issued_at=datetime.now(UTC))
    assert impostor.publish_wait(T.desired("node-1"), desired.to_json(), retain=True)
    wait_for(lambda: watch.refused("impostor"), 60, "node-1 refusing the revoked bundle")

    # An impostor with the hub's broker password: a revocation of 1.0.0 it signed
    # with a key of its own, and an unsigned one.
    mallory = load_private_key(generate_keypair(tmp_path / "mallory", "mallory")[0])
    forged = sign_revocation(mallory, ref(v1, keys), "forged")
    unsigned = forged.model_copy(update={"signature": None, "key_id": None})
    for rev, why in ((forged, "does not match any trusted key"), (unsigned, "is not signed")):
        fake = RevocationList(revoked=[rev], issued_at=datetime.now(UTC))
        assert impostor.publish_wait(T.hub_revoked(), fake.to_json(), retain=True)
        # (one at a time: the node takes the newest list it heard of)
        wait_for(partial(revocation_refused, node, why), 60, f"refused: {why}")
    assert "leaves out 1 known revocation" in node.text()
    assert not retained_lists(lab_broker, v2_ref)
    kept = RevocationList.model_validate_json(
        (tmp_path / "node-store" / "revoked.json").read_bytes()
    )
    assert v2_ref.manifest_sha256 in kept.shas(), "the impostor's lists made node-1 forget"
    # The hub, back, publishes its own list again (for the nodes that start later: the
    # impostor's is the retained one), and does so at once when an impostor replaces it.
    restored.start()
    wait_for(partial(retained_lists, lab_broker, v2_ref), 60, "the hub's list back")
    fake = RevocationList(revoked=[unsigned], issued_at=datetime.now(UTC))
    assert impostor.publish_wait(T.hub_revoked(), fake.to_json(), retain=True)
    wait_for(lambda: "leaves out 1 this hub knows" in restored.text(), 60, "the hub noticing")
    wait_for(partial(retained_lists, lab_broker, v2_ref), 60, "the hub's list back again")

    # A restart of the node: still 1.0.0, and it answers with 1.0.0.
    assert node.stop() == 0
    restarted = len(watch.status.messages)
    node.start()
    watch.wait_serving("1.0.0", since=restarted)
    requester = Requester(lab_broker.settings("client"))
    try:
        answer: Result = requester.request(images.jpeg())
    finally:
        requester.close()
    assert answer.status == "ok" and answer.model is not None
    assert answer.model.version == "1.0.0"
    later = [NodeStatus.model_validate_json(m.payload) for m in watch.status.messages[since:]]
    assert {s.model.version for s in later if s.model is not None} == {"1.0.0"}
    stored = RevocationList.model_validate_json(
        (tmp_path / "node-store" / "revoked.json").read_bytes()
    )
    assert stored.shas() == {v2_ref.manifest_sha256}
    watch.close()
