"""End to end with real nodes (cellwatch.node's update agent, in-process) and a real
hub over the real broker: push -> rollout -> active, abort and rollback, offline
convergence, and a download resumed after the broker restarts."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.fetch import by_node
from cellwatch.node.service import NodeService
from cellwatch.shared.hubapi import RolloutInfo, RolloutStartArgs
from cellwatch.shared.schemas import Result
from cellwatch.shared.signing import generate_keypair
from tests import images
from tests.broker import Broker
from tests.harness import Requester, Sent, wait_for
from tests.helpers.nodes import node_settings
from tests.helpers.rollouts import hub_sees, states, until
from tests.hub.conftest import Bundles, HubFactory
from tests.models import write_test_bundle


@dataclass(frozen=True)
class Release:
    """v2 signed by a second key `release2`: the hub and most nodes trust it, a node
    configured with only the first key does not."""

    hub_keys: Path
    v2: Path
    only_first_key: Path


@pytest.fixture(scope="module")
def release(bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Release:
    root = tmp_path_factory.mktemp("release")
    generate_keypair(root / "k2", "release2")
    v2 = write_test_bundle(root / "v2", root / "k2", version="2.0.0", seed=5, key_name="release2")
    hub_keys = root / "hub-keys"
    hub_keys.mkdir()
    shutil.copy(bundles.keys / "test.pub", hub_keys)
    shutil.copy(root / "k2" / "release2.pub", hub_keys)
    only_first = root / "only-first"
    only_first.mkdir()
    shutil.copy(bundles.keys / "test.pub", only_first)
    return Release(hub_keys, v2, only_first)


RealNodes = Callable[..., NodeService]


@pytest.fixture
def requester(broker: Broker) -> Iterator[Requester]:
    r = Requester(broker.settings("client"))
    yield r
    r.close()


@pytest.fixture
def real_nodes(
    broker: Broker, bundles: Bundles, release: Release, tmp_path: Path
) -> Iterator[RealNodes]:
    running: list[NodeService] = []

    def make(node_id: str, *, keys: Path | None = None, **updates: Any) -> NodeService:
        settings = node_settings(
            broker,
            (bundles.v1, keys or release.hub_keys),
            node_id,
            updates={"store_dir": tmp_path / node_id, "chunk_timeout_s": 2.0, **updates},
        )
        node = NodeService(settings)
        node.start()
        running.append(node)
        return node

    yield make
    for node in running:
        if node.mqtt.connected:
            node.join()


def serving(node: NodeService) -> str:
    assert node.model is not None
    return node.model.bundle.manifest.version


class Traffic:
    """Sends images all along; every Result is kept."""

    def __init__(self, requester: Requester) -> None:
        self.requester = requester
        self.corrs: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.corrs.append(self.requester.send(images.jpeg()))

    def stop(self) -> list[Result]:
        self._stop.set()
        self._thread.join()
        return [self.requester.result(c) for c in self.corrs]


def test_push_rollout_to_three_real_nodes_while_serving(
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    release: Release,
    real_nodes: RealNodes,
    requester: Requester,
) -> None:
    hub_factory(trusted_keys=release.hub_keys)
    nodes = [real_nodes(f"node-{i}") for i in (1, 2, 3)]
    hub_sees(operator, ["node-1", "node-2", "node-3"])
    operator.push(release.v2)
    traffic = Traffic(requester)
    wait_for(lambda: requester.count() >= 10, what="traffic before the rollout")
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    info = until(operator, rid, lambda i: i.state == "completed", timeout=120)
    after = [requester.request(images.jpeg()) for _ in range(10)]
    results = traffic.stop()
    assert [w.size for w in info.waves] == [1, 2]  # 1,25%,100% of 3 nodes
    assert all(serving(n) == "2.0.0" for n in nodes)
    assert all(r.status == "ok" for r in results + after)
    for node_id in ("node-1", "node-2", "node-3"):  # each node: v1 results, then v2 only
        versions = [r.model.version for r in results if r.node_id == node_id and r.model]
        assert versions == sorted(versions), node_id
    assert {r.model.version for r in after if r.model} == {"2.0.0"}
    assert {r.model.version for r in results if r.model} == {"1.0.0", "2.0.0"}


def test_a_node_refusing_the_signer_aborts_and_rollback_is_local(
    hub_factory: HubFactory,
    operator: HubClient,
    release: Release,
    real_nodes: RealNodes,
) -> None:
    hub_factory(trusted_keys=release.hub_keys)
    n1 = real_nodes("node-1")
    n2 = real_nodes("node-2", keys=release.only_first_key)  # does not trust release2
    n3 = real_nodes("node-3")
    hub_sees(operator, ["node-1", "node-2", "node-3"])
    operator.push(release.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", waves="1,2,100%")
    ).rollout_id
    info: RolloutInfo = until(operator, rid, lambda i: i.state == "aborted", timeout=120)
    assert states(info) == {"node-1": "active", "node-2": "failed", "node-3": "waiting"}
    err = next(t.error for t in info.targets if t.node_id == "node-2")
    assert err is not None and err.code == "bad_signature"
    assert (serving(n1), serving(n2), serving(n3)) == ("2.0.0", "1.0.0", "1.0.0")
    assert n3.updater is not None and n3.updater.last_report is None  # never asked
    assert n1.fetcher is not None
    fetched = n1.fetcher.bytes_received
    served = operator.stats().bytes_by_node.get("node-1")
    operator.rollout_verb("rollback", rid)
    info = until(operator, rid, lambda i: i.state == "rolled_back", timeout=60)
    assert states(info)["node-1"] == "rolled_back" and serving(n1) == "1.0.0"
    assert n1.fetcher.bytes_received == fetched  # from its own store: no download
    assert operator.stats().bytes_by_node.get("node-1") == served


def test_an_offline_real_node_converges_when_it_returns(
    hub_factory: HubFactory,
    operator: HubClient,
    release: Release,
    real_nodes: RealNodes,
) -> None:
    hub_factory(trusted_keys=release.hub_keys)
    first = real_nodes("node-3")
    hub_sees(operator, ["node-3"])
    first.join()
    wait_for(lambda: operator.nodes().nodes[0].state == "offline", what="offline")
    operator.push(release.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", target="node:node-3")
    ).rollout_id
    assert states(operator.rollout_status(rid)) == {"node-3": "pending"}
    again = real_nodes("node-3")
    until(operator, rid, lambda i: i.state == "completed", timeout=120)
    assert serving(again) == "2.0.0"


def test_a_download_resumes_after_the_broker_restarts(
    broker: Broker,
    hub_factory: HubFactory,
    operator: HubClient,
    release: Release,
    real_nodes: RealNodes,
) -> None:
    """The hub stops mid-download (so the download cannot race ahead), the broker
    restarts (the node's connection is cut), a new hub starts: the node asks again
    from its last good offset, not from zero."""
    chunk = 4096
    hub = hub_factory(trusted_keys=release.hub_keys, max_chunk_bytes=chunk)
    node = real_nodes("node-1", chunk_bytes=chunk, fetch_window=2, chunk_timeout_s=2.0)
    hub_sees(operator, ["node-1"])
    operator.push(release.v2)
    size = sum(p.stat().st_size for p in release.v2.iterdir())
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    wait_for(lambda: by_node(hub.fetch.served()).get("node-1", 0) > 0.2 * size, 60, "20% sent")
    hub.join()
    first = by_node(hub.fetch.served())["node-1"]
    assert first < 0.9 * size, "the download finished before the hub stopped"
    broker.restart()
    hub_factory(trusted_keys=release.hub_keys, max_chunk_bytes=chunk)
    info = until(operator, rid, lambda i: i.state == "completed", timeout=120)
    assert states(info) == {"node-1": "active"} and serving(node) == "2.0.0"
    # The hub keeps its bytes-served totals across the restart: the new hub sent
    # the difference.
    second = operator.stats().bytes_by_node["node-1"] - first
    # From zero, the new hub would send the whole bundle again; resuming, it sends
    # the rest plus at most the requests re-sent while it was away.
    assert second <= size - first + 16 * chunk, (first, second, size)


def test_a_node_asking_for_larger_chunks_than_the_hub_sends_still_converges(
    hub_factory: HubFactory, operator: HubClient, release: Release, real_nodes: RealNodes
) -> None:
    """The hub clamps each chunk to its max_chunk_bytes; the node advances by what it
    got, asks for the rest, and uses the hub's size from then on (it used to advance
    by its own chunk size and wait forever for the gaps)."""
    hub = hub_factory(trusted_keys=release.hub_keys, max_chunk_bytes=16384)
    node = real_nodes("node-1", chunk_bytes=65536)
    hub_sees(operator, ["node-1"])
    operator.push(release.v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    info = until(operator, rid, lambda i: i.state in ("completed", "aborted"), timeout=120)
    assert states(info) == {"node-1": "active"} and serving(node) == "2.0.0"
    size = sum(p.stat().st_size for p in release.v2.iterdir())
    assert node.fetcher is not None and node.fetcher.bytes_received == size
    assert by_node(hub.fetch.served())["node-1"] >= size
