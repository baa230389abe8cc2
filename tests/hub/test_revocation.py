"""Revocation and key rotation, with the real hub, the real broker and real nodes.

`cellwatch-hub models revoke NAME VERSION --reason ...` stores the revocation,
refuses rollouts (and pushes) of the model, aborts its active rollouts and publishes
the list of revoked bundles (retained, `{prefix}/hub/revoked`, only the hub may
write it: tests/deploy/test_acl.py). Nodes refuse a revoked bundle and move off it to
their previous good one; key rotation leaves no node without a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.service import HubService
from cellwatch.node.faults import Faults
from cellwatch.node.service import NodeService
from cellwatch.shared.hubapi import NodeInfo, RevokeArgs, RevokeReply, RolloutStartArgs
from cellwatch.shared.revocations import sign_revocation
from cellwatch.shared.schemas import (
    DesiredModel,
    RevocationList,
    UpdateReport,
)
from cellwatch.shared.signing import generate_keypair, key_id, load_private_key
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.helpers.hubcli import cli
from tests.helpers.nodes import node_settings
from tests.helpers.rollouts import ref, states, until
from tests.hub.conftest import Bundles, HubFactory, NodeMaker
from tests.hub.web import get, sample, scrape

Nodes = Callable[..., NodeService]


TRAIN = str(Path(sys.executable).with_name("cellwatch-train"))


@pytest.fixture
def nodes(broker: Broker, bundles: Bundles, tmp_path: Path) -> Iterator[Nodes]:
    running: list[NodeService] = []

    def make(node_id: str = "node-1", *, keys: Path | None = None, **updates: Any) -> NodeService:
        settings = node_settings(
            broker,
            (bundles.v1, keys or bundles.keys),
            node_id,
            updates={"store_dir": tmp_path / node_id, "chunk_timeout_s": 2.0, **updates},
        )
        node = NodeService(settings, faults=Faults())
        node.start()
        running.append(node)
        return node

    yield make
    for node in running:
        node.join()


@pytest.fixture
def requester(broker: Broker) -> Iterator[Requester]:
    r = Requester(broker.settings("client"))
    yield r
    r.close()


def revoke(
    operator: HubClient, bundles: Bundles, version: str, reason: str = "wrong labels"
) -> RevokeReply:
    """Revoke toy VERSION, signed with the test release key (a trusted key)."""
    return operator.revoke("toy", version, reason, bundles.keys / "test.key")


def version(node: NodeService) -> str | None:
    return node.model.bundle.manifest.version if node.model is not None else None


def node_info(operator: HubClient, node_id: str) -> NodeInfo:
    return next(n for n in operator.nodes().nodes if n.node_id == node_id)


def on(operator: HubClient, ids: list[str], version: str) -> None:
    def ok() -> bool:
        by_id = {n.node_id: n for n in operator.nodes().nodes}
        return all(
            i in by_id and by_id[i].model is not None and by_id[i].model.version == version  # type: ignore[union-attr]
            for i in ids
        )

    wait_for(ok, 60, f"{ids} on {version}")


def test_revoked_and_unknown_models_are_refused(
    broker: Broker,
    hub: HubService,
    operator: HubClient,
    bundles: Bundles,
    fake_nodes: NodeMaker,
) -> None:
    fake = fake_nodes("node-1", model=ref(bundles))
    wait_for(lambda: len(operator.nodes().nodes) == 1, what="node-1 seen")
    operator.push(bundles.v2)
    sha = bundles.sha(bundles.v2)
    assert "error" not in fake.fetch(sha, "manifest.json").props
    mallory = load_private_key(bundles.untrusted.parent / "other-keys" / "mallory.key")
    forged = sign_revocation(mallory, ref(bundles, "2.0.0"), "forged")
    for bad in (forged, forged.model_copy(update={"signature": None})):
        with pytest.raises(ApiFailure) as err:  # not signed by a trusted key
            operator.call("models.revoke", RevokeArgs(revocation=bad))
        assert err.value.code == "bad_signature"
    with pytest.raises(ApiFailure) as err:  # unknown model
        operator.rollout_start(RolloutStartArgs(name="toy", version="9.9.9"))
    assert err.value.code == "not_found" and "known versions: 2.0.0" in err.value.message
    with pytest.raises(ApiFailure) as err:
        revoke(operator, bundles, "9.9.9")
    assert err.value.code == "not_found"

    watch = Collector(broker.settings("node-1"), T.hub_revoked(), name="watch")
    reply = revoke(operator, bundles, "2.0.0", "trained on the wrong labels")
    assert reply.model.revoke_reason == "trained on the wrong labels"
    assert reply.model.revoked_at is not None and reply.nodes == [] and reply.aborted == []
    # The fetch server hands out no file of it (a node that lost its list cannot get it).
    assert fake.fetch(sha, "manifest.json").props.get("error") == "revoked"
    with pytest.raises(ApiFailure) as err:  # a revoked model
        operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0"))
    assert err.value.code == "revoked" and "wrong labels" in err.value.message
    with pytest.raises(ApiFailure) as err:  # pushed again: still revoked
        operator.push(bundles.v2)
    assert err.value.code == "revoked"
    assert (
        revoke(operator, bundles, "2.0.0", "again").model.revoke_reason
        == "trained on the wrong labels"
    )
    assert operator.rollout_list().rollouts == []

    def published() -> list[str]:
        lists = [RevocationList.model_validate_json(m.payload) for m in watch.messages]
        return [r.manifest_sha256 for r in lists[-1].revoked] if lists else []

    wait_for(lambda: published() == [bundles.sha(bundles.v2)], what="the revocation list")
    watch.close()
    late = Collector(broker.settings("node-2"), T.hub_revoked(), name="late")  # retained
    wait_for(lambda: bool(late.messages), what="the retained revocation list")
    assert late.messages[0].retained
    late.close()

    page = get(hub, "/").text
    assert "revoked" in page and "trained on the wrong labels" in page
    assert sample(scrape(hub), "cellwatch_hub_models_revoked") == 1.0
    models = json.loads(cli(broker, "models", "--json").stdout)["models"]
    assert [m["revoke_reason"] for m in models] == ["trained on the wrong labels"]
    table = cli(broker, "models").stdout
    assert "wrong labels" in table


def test_the_cli_revokes_and_explains(
    broker: Broker, hub: Any, operator: HubClient, bundles: Bundles
) -> None:
    operator.push(bundles.v2)
    key = str(bundles.keys / "test.key")
    r = cli(broker, "models", "revoke", "toy", "2.0.0", "--reason", "bad batch", "--sign-key", key)
    assert r.returncode == 0, r.stderr
    assert "revoked toy 2.0.0" in r.stdout and "bad batch" in r.stdout
    assert "no node was serving it" in r.stdout
    r = cli(broker, "models", "revoke", "toy", "9.9.9", "--reason", "x", "--sign-key", key)
    assert r.returncode == 2 and r.stderr.startswith("error: no model toy 9.9.9")
    r = cli(broker, "models", "revoke", "toy", "2.0.0")
    assert r.returncode == 2 and "--reason" in r.stderr


def test_nodes_move_off_a_revoked_bundle_and_refuse_it(
    broker: Broker,
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    nodes: Nodes,
    requester: Requester,
) -> None:
    hub_factory()
    n1, n2 = nodes("node-1"), nodes("node-2")
    on(operator, ["node-1", "node-2"], "1.0.0")
    operator.push(bundles.v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    until(operator, rid, lambda i: i.state == "completed", timeout=120)
    assert version(n1) == version(n2) == "2.0.0"

    reply = revoke(operator, bundles, "2.0.0", "wrong labels")
    assert reply.nodes == ["node-1", "node-2"]
    # Their retained desired model named 2.0.0: the rollout rolls back to 1.0.0.
    assert reply.moved == ["node-1", "node-2"]
    wait_for(lambda: version(n1) == version(n2) == "1.0.0", 60, "both back on 1.0.0")
    for node in (n1, n2):  # moved by the revocation or by the desired model, first wins
        assert node.model_error is None or node.model_error.code == "revoked"
    r = requester.request(images.jpeg())
    assert r.status == "ok" and r.model is not None and r.model.version == "1.0.0"
    on(operator, ["node-1", "node-2"], "1.0.0")
    until(operator, rid, lambda i: i.state == "rolled_back", timeout=60)

    # A restart keeps it off 2.0.0 (the revocation list is in its store), and its
    # retained desired model names 1.0.0 now.
    n1.join()
    again = nodes("node-1")
    assert version(again) == "1.0.0" and again.model_error is None  # its active bundle
    assert again.updater is not None
    wait_for(
        lambda: (
            again.updater is not None
            and again.updater.last_report is not None
            and again.updater.last_report.model.version == "1.0.0"
        ),
        30,
        "the node confirming its desired 1.0.0",
    )
    assert version(again) == "1.0.0"


def test_a_node_refuses_a_revoked_desired_model(
    broker: Broker,
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    nodes: Nodes,
) -> None:
    """A retained desired model that still names a revoked bundle (a node that had no
    earlier model to go back to, a hub restored from before the revocation): the node
    refuses it with `revoked` and keeps its model."""
    hub_factory()
    node = nodes("node-1")
    on(operator, ["node-1"], "1.0.0")
    operator.push(bundles.v2)
    revoke(operator, bundles, "2.0.0", "wrong labels")
    wait_for(lambda: node.updater is not None and bool(node.updater.revoked), 30, "the list")
    watch = Collector(broker.settings("hub"), T.update("node-1"))
    hub = broker.connect("hub")
    desired = DesiredModel(
        rollout_id="r-old", model=ref(bundles, "2.0.0"), issued_at=datetime.now(UTC)
    )
    assert hub.publish_wait(T.desired("node-1"), desired.to_json(), retain=True)

    def refused() -> bool:
        reports = [UpdateReport.model_validate_json(m.payload) for m in watch.messages]
        return any(
            r.rollout_id == "r-old"
            and r.state == "failed"
            and r.error
            and r.error.code == "revoked"
            for r in reports
        )

    wait_for(refused, 30, "a failed/revoked report")
    assert version(node) == "1.0.0"
    watch.close()


def test_revoking_the_only_bundle_leaves_no_model(
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    nodes: Nodes,
    requester: Requester,
) -> None:
    hub_factory()
    node = nodes()
    on(operator, ["node-1"], "1.0.0")
    operator.push(bundles.v1)
    reply = revoke(operator, bundles, "1.0.0", "do not use")
    assert reply.nodes == ["node-1"]
    wait_for(lambda: node.model is None, 30, "no model")
    assert node.model_error is not None and node.model_error.code == "revoked"
    assert "no earlier bundle loads" in node.model_error.message
    r = requester.request(images.jpeg())
    assert r.status == "error" and r.error is not None and r.error.code == "no_model"


def test_key_rotation_leaves_no_node_without_a_model(
    broker: Broker,
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    nodes: Nodes,
    requester: Requester,
    tmp_path: Path,
) -> None:
    """The procedure in hub/README.md: (1) add the new key next to the old one on the
    hub and every node; (2) re-sign the bundles still in use with the new key and push
    them again, revoke the others; (3) remove the old key. Nodes fetch the re-signed
    bundle again when their copy no longer verifies."""
    old_keys = tmp_path / "keys-old"
    shutil.copytree(bundles.keys, old_keys)
    hub = hub_factory(trusted_keys=old_keys)
    n1, n2 = nodes("node-1", keys=old_keys), nodes("node-2", keys=old_keys)
    on(operator, ["node-1", "node-2"], "1.0.0")
    operator.push(bundles.v1)
    operator.push(bundles.v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    until(operator, rid, lambda i: i.state == "completed", timeout=120)

    # (1) the new key, trusted next to the old one
    both = tmp_path / "keys-both"
    shutil.copytree(old_keys, both)
    generate_keypair(tmp_path / "new-key", "release-2027")
    shutil.copy(tmp_path / "new-key" / "release-2027.pub", both)
    hub.join()
    hub = hub_factory(trusted_keys=both)
    n1.join()
    n2.join()
    n1, n2 = nodes("node-1", keys=both), nodes("node-2", keys=both)
    on(operator, ["node-1", "node-2"], "2.0.0")

    # (2) 2.0.0 stays in use: re-signed with the new key and pushed again (same
    # manifest, so the same model); 1.0.0 is revoked.
    resigned = tmp_path / "v2-resigned"
    shutil.copytree(bundles.v2, resigned)
    new_key = tmp_path / "new-key" / "release-2027.key"
    r = subprocess.run(
        [TRAIN, "sign", str(resigned), "--key", str(new_key)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    new_id = key_id(load_private_key(new_key).public_key())
    pushed = operator.push(resigned)  # the same manifest: the hub keeps the new signature
    assert pushed.status == "already_present" and pushed.model["signer"] == new_id
    assert revoke(operator, bundles, "1.0.0", "signed with the retired key").nodes == []

    # (3) the old key goes
    new_only = tmp_path / "keys-new"
    new_only.mkdir()
    shutil.copy(tmp_path / "new-key" / "release-2027.pub", new_only)
    hub.join()
    hub_factory(trusted_keys=new_only)
    n1.join()
    n2.join()
    n1, n2 = nodes("node-1", keys=new_only), nodes("node-2", keys=new_only)
    # Each node's copy of 2.0.0 carries the old signature: it fetches the re-signed
    # one again (its retained desired names 2.0.0), and serves it.
    wait_for(lambda: version(n1) == version(n2) == "2.0.0", 120, "both on 2.0.0 again")
    for node in (n1, n2):
        assert node.model_error is None, node.model_error
    r2 = requester.request(images.jpeg())
    assert r2.status == "ok" and r2.model is not None and r2.model.version == "2.0.0"
    assert states(operator.rollout_status(rid)) == {"node-1": "active", "node-2": "active"}
