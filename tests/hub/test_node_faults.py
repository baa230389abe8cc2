"""Real nodes (in-process, real OpenVINO) against the real hub when things break: a
full disk while staging, OpenVINO failing to compile, an unexpected exception in the
update agent, a damaged bundle in the store, a trusted key removed. The node keeps
serving what it can, says why (update reports, NodeStatus.model_error), and heals
by fetching again; the hub shows it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cellwatch.hub import render
from cellwatch.hub.client import HubClient
from cellwatch.hub.fetch import by_node
from cellwatch.node.engine import ServingModel
from cellwatch.node.faults import Faults
from cellwatch.node.service import NodeService
from cellwatch.shared.hubapi import NodeInfo, RolloutInfo, RolloutStartArgs
from cellwatch.shared.schemas import DesiredModel, NodeStatus
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.helpers.nodes import node_settings
from tests.helpers.rollouts import until
from tests.hub.conftest import Bundles, HubFactory
from tests.hub.web import get, sample, scrape

Nodes = Callable[..., NodeService]


@pytest.fixture
def nodes(broker: Broker, bundles: Bundles, tmp_path: Path) -> Iterator[Nodes]:
    """Real nodes on toy 1.0.0 with a bundle store (tmp_path/NODE_ID)."""
    running: list[NodeService] = []

    def make(
        node_id: str = "node-1",
        *,
        keys: Path | None = None,
        faults: Faults | None = None,
        **updates: Any,
    ) -> NodeService:
        settings = node_settings(
            broker,
            (bundles.v1, keys or bundles.keys),
            node_id,
            updates={"store_dir": tmp_path / node_id, "chunk_timeout_s": 2.0, **updates},
        )
        node = NodeService(settings, faults=faults or Faults())
        node.start()
        running.append(node)
        return node

    yield make
    for node in running:
        node.join()  # idempotent


@pytest.fixture
def requester(broker: Broker) -> Iterator[Requester]:
    r = Requester(broker.settings("client"))
    yield r
    r.close()


def version(node: NodeService) -> str | None:
    return node.model.bundle.manifest.version if node.model is not None else None


def info(operator: HubClient, node_id: str) -> NodeInfo:
    return next(n for n in operator.nodes().nodes if n.node_id == node_id)


def rollout(operator: HubClient, version: str, node_id: str = "node-1") -> RolloutInfo:
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version=version, target=f"node:{node_id}")
    ).rollout_id
    return until(operator, rid, lambda i: i.state in ("completed", "aborted"), timeout=120)


def error_of(r: RolloutInfo, node_id: str = "node-1") -> str:
    t = next(t for t in r.targets if t.node_id == node_id)
    assert t.error is not None, t
    return t.error.code


def seen(operator: HubClient, node_id: str, version: str) -> None:
    def ok() -> bool:
        n = {x.node_id: x for x in operator.nodes().nodes}.get(node_id)
        return (
            n is not None
            and n.state == "online"
            and n.model is not None
            and (n.model.version == version)
        )

    wait_for(ok, 30, f"the hub to see {node_id} on {version}")


def test_a_full_disk_while_staging_fails_the_update_and_the_agent_goes_on(
    hub_factory: HubFactory, operator: HubClient, bundles: Bundles, nodes: Nodes
) -> None:
    hub_factory()
    node = nodes(faults=Faults(disk_full_once=True))
    seen(operator, "node-1", "1.0.0")
    operator.push(bundles.v2)
    failed = rollout(operator, "2.0.0")
    assert failed.state == "aborted" and error_of(failed) == "disk_full"
    assert version(node) == "1.0.0"
    assert node.store is not None and not node.store.has(bundles.sha(bundles.v2))
    again = rollout(operator, "2.0.0")  # the disk has room again: the same agent goes on
    assert again.state == "completed" and version(node) == "2.0.0"


def test_openvino_failing_and_an_unexpected_error_fail_the_update_and_the_agent_goes_on(
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    nodes: Nodes,
    requester: Requester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub_factory()
    node = nodes(faults=Faults(compile_raises_at=2))  # 1: the start bundle
    seen(operator, "node-1", "1.0.0")
    operator.push(bundles.v2)
    operator.push(bundles.v3)
    failed = rollout(operator, "2.0.0")
    assert error_of(failed) == "compile_error"
    t = failed.targets[0]
    assert t.error is not None and "test fault: compile 2 fails" in t.error.message
    assert requester.request(images.jpeg()).status == "ok" and version(node) == "1.0.0"

    assert node.updater is not None
    obtain = node.updater._obtain
    bugs = ["a bug"]

    def broken(d: DesiredModel, generation: int) -> ServingModel:  # a bug in the agent, once
        if bugs:
            raise KeyError(bugs.pop())
        return obtain(d, generation)

    monkeypatch.setattr(node.updater, "_obtain", broken)
    failed = rollout(operator, "3.0.0")
    t = failed.targets[0]
    assert t.error is not None and t.error.code == "internal" and "a bug" in t.error.message
    done = rollout(operator, "3.0.0")
    assert done.state == "completed" and version(node) == "3.0.0"
    assert requester.request(images.jpeg()).status == "ok"


def test_a_damaged_bundle_in_the_store_is_fetched_again(
    hub_factory: HubFactory, operator: HubClient, bundles: Bundles, nodes: Nodes
) -> None:
    hub = hub_factory()
    node = nodes()
    seen(operator, "node-1", "1.0.0")
    operator.push(bundles.v2)
    first = rollout(operator, "2.0.0")
    assert first.state == "completed"
    back = operator.rollout_verb("rollback", first.rollout_id)
    until(operator, back.rollout_id, lambda i: i.state == "rolled_back", timeout=60)
    assert version(node) == "1.0.0"
    assert node.store is not None and node.fetcher is not None
    v2 = bundles.sha(bundles.v2)
    stored = node.store.path(v2) / "model.bin"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))  # a bad sector, a half-written file
    before = node.fetcher.bytes_received
    size = sum(p.stat().st_size for p in bundles.v2.iterdir())
    again = rollout(operator, "2.0.0")
    assert again.state == "completed" and version(node) == "2.0.0"
    assert node.fetcher.bytes_received - before == size  # fetched again, whole
    assert by_node(hub.fetch.served())["node-1"] == 2 * size


def test_a_damaged_active_bundle_at_start_falls_back_and_heals(
    broker: Broker, hub_factory: HubFactory, operator: HubClient, bundles: Bundles, nodes: Nodes
) -> None:
    hub_factory()
    node = nodes()
    seen(operator, "node-1", "1.0.0")
    operator.push(bundles.v2)
    assert rollout(operator, "2.0.0").state == "completed"  # desired stays 2.0.0 (retained)
    node.join()
    assert node.store is not None
    v2 = bundles.sha(bundles.v2)
    (node.store.path(v2) / "golden.npz").write_bytes(b"not the golden vectors")
    watch = Collector(broker.settings("hub"), T.status("node-1"))
    again = nodes()

    def statuses() -> list[NodeStatus]:
        return [NodeStatus.model_validate_json(m.payload) for m in watch.on(T.status("node-1"))]

    # It starts on the bundle before (1.0.0), says why, fetches 2.0.0 again.
    wait_for(lambda: version(again) == "2.0.0", 60, "2.0.0 fetched again")
    fallback = next(s for s in statuses() if s.model_error is not None)
    assert fallback.model is not None and fallback.model.version == "1.0.0"
    assert fallback.model_error is not None
    assert fallback.model_error.code == "hash_mismatch"
    assert "golden.npz" in fallback.model_error.message
    assert "serving toy 1.0.0" in fallback.model_error.message
    wait_for(lambda: statuses()[-1].model_error is None, what="the error cleared")
    assert again.model_error is None
    seen(operator, "node-1", "2.0.0")
    assert info(operator, "node-1").model_error is None
    watch.close()


def test_a_trusted_key_removed_leaves_no_model_and_the_hub_shows_why(
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    nodes: Nodes,
    requester: Requester,
    tmp_path: Path,
) -> None:
    hub = hub_factory()
    node = nodes()
    seen(operator, "node-1", "1.0.0")
    node.join()
    other = tmp_path / "other-keys"  # a trusted-keys directory without the signer's key
    other.mkdir()
    shutil.copy(bundles.untrusted.parent / "other-keys" / "mallory.pub", other)
    again = nodes(keys=other)  # it starts, connects and says why
    assert again.model is None and again.model_error is not None
    assert again.model_error.code == "bad_signature"
    r = requester.request(images.jpeg())
    assert r.status == "error" and r.error is not None and r.error.code == "no_model"

    def shown() -> bool:
        n = info(operator, "node-1")
        return n.state == "online" and n.model is None and n.model_error is not None

    wait_for(shown, 30, "the hub to show the model error")
    err = info(operator, "node-1").model_error
    assert err is not None and err.code == "bad_signature" and "answering no_model" in err.message
    console = Console(width=200, record=True)  # what `cellwatch-hub nodes` prints
    console.print(render.nodes_table(operator.nodes().nodes))
    assert "node-1: bad_signature" in console.export_text()
    page = get(hub, "/").text  # the fleet page's node row and the node's own page
    assert 'data-model-error="bad_signature"' in page
    assert "answering no_model" in get(hub, "/nodes/node-1").text
    labels = {"node_id": "node-1", "model_version": "", "code": "bad_signature"}
    assert sample(scrape(hub), "cellwatch_node_model_error", **labels) == 1.0
