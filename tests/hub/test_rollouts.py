"""Rollouts end to end on the hub side: real hub, real broker, scripted nodes."""

from __future__ import annotations

import threading
import time

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.service import HubService
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.states import NodeState, UpdateState
from tests.harness import wait_for
from tests.helpers.rollouts import fleet_on_v1, ref, seen_by_hub, states, until
from tests.hub.conftest import Bundles, HubFactory, NodeMaker


def test_waves_issue_one_after_the_other(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    n1, n2, n3 = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    info = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0", waves="1,2,100%"))
    rid = info.rollout_id
    assert [w.size for w in info.waves] == [1, 1, 1]
    wait_for(lambda: len(n1.desired) == 1, what="canary desired")
    d = n1.desired[0]
    assert d.rollout_id == rid and d.model.manifest_sha256 == ref(bundles, "2.0.0").manifest_sha256
    n1.report(d, UpdateState.DOWNLOADING, 0.5)
    until(operator, rid, lambda i: states(i)["node-1"] == "downloading")
    assert n2.desired == [] and n3.desired == []
    n1.report(d, UpdateState.ACTIVE, 1.0)
    wait_for(lambda: len(n2.desired) == 1, what="wave 2")
    assert n3.desired == []
    n2.report(n2.desired[0], UpdateState.ACTIVE, 1.0)
    wait_for(lambda: len(n3.desired) == 1, what="wave 3")
    n3.report(n3.desired[0], UpdateState.ACTIVE, 1.0)
    done = until(operator, rid, lambda i: i.state == "completed")
    assert states(done) == {"node-1": "active", "node-2": "active", "node-3": "active"}
    assert done.reason == "3 of 3 nodes active"


def test_rollout_downloads_and_completes(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    nodes = fleet_on_v1(bundles, fake_nodes)
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    until(operator, rid, lambda i: i.state == "completed")
    v2 = ref(bundles, "2.0.0")
    size = sum(p.stat().st_size for p in bundles.v2.iterdir())
    assert all(n.model == v2 and n.bytes_fetched == size for n in nodes)
    wait_for(lambda: all(n.model == v2 for n in operator.nodes().nodes), what="fleet on v2")
    assert operator.stats().bytes_by_bundle == {v2.manifest_sha256: 3 * size}


def test_a_failure_aborts_and_rollback_needs_no_download(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    n1, n2, n3 = fleet_on_v1(bundles, fake_nodes)
    n2.behaviour = "fail"
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", waves="1,2,100%")
    ).rollout_id
    info = until(operator, rid, lambda i: i.state == "aborted")
    assert states(info) == {"node-1": "active", "node-2": "failed", "node-3": "waiting"}
    failed = next(t for t in info.targets if t.node_id == "node-2")
    assert failed.error is not None and failed.error.code == "self_test_failed"
    assert "max_failures" in (info.reason or "")
    assert n3.desired == []  # the rollout stopped before the last wave
    served = operator.stats().bytes_served
    back = operator.rollout_verb("rollback", rid)
    assert back.state == "rolling_back"
    info = until(operator, rid, lambda i: i.state == "rolled_back")
    assert states(info) == {"node-1": "rolled_back", "node-2": "rolled_back", "node-3": "waiting"}
    assert n1.model == ref(bundles) and n1.desired[-1].rollout_id == rid
    assert operator.stats().bytes_served == served  # from the node's own store
    with pytest.raises(ApiFailure) as err:
        operator.rollout_verb("rollback", rid)
    assert err.value.code == "conflict"


def test_pause_resume_abort_over_the_api(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    n1, n2, n3 = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    operator.push(bundles.v3)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", waves="1,2,100%")
    ).rollout_id
    wait_for(lambda: len(n1.desired) == 1, what="canary desired")
    assert operator.rollout_verb("pause", rid).state == "paused"
    n1.report(n1.desired[0], UpdateState.ACTIVE, 1.0)
    until(operator, rid, lambda i: states(i)["node-1"] == "active")
    assert n2.desired == []  # paused: no new wave
    with pytest.raises(ApiFailure) as err:  # another rollout (a stored model) on the same nodes
        operator.rollout_start(RolloutStartArgs(name="toy", version="3.0.0"))
    assert err.value.code == "conflict"
    assert "node-1, node-2, node-3" in err.value.message and rid in err.value.message
    assert [r.rollout_id for r in operator.rollout_list().rollouts] == [rid]  # none started
    assert operator.rollout_verb("resume", rid).state == "running"
    wait_for(lambda: len(n2.desired) == 1, what="wave 2 after resume")
    info = operator.rollout_verb("abort", rid)
    assert info.state == "aborted" and info.reason == "aborted by the operator"
    n2.report(n2.desired[0], UpdateState.ACTIVE, 1.0)  # it goes on: recorded
    until(operator, rid, lambda i: states(i)["node-2"] == "active")
    assert n3.desired == []


class SteppedClock:
    """The rollout timers' monotonic clock (Orchestrator.clock) plus whatever the test
    adds: an hour passes for the timers without the test waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset = 0.0
        self.read = threading.Event()
        """Set when the hub read the clock since the last step."""

    def __call__(self) -> float:
        with self._lock:
            self.read.set()
            return time.monotonic() + self._offset

    def step(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds
            self.read.clear()


def test_an_offline_node_converges_when_it_returns(
    broker: object,
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    fake_nodes: NodeMaker,
) -> None:
    hub = hub_factory()
    clock = hub.orchestrator.clock = SteppedClock()
    gone = fake_nodes("node-3", model=ref(bundles))
    wait_for(lambda: len(operator.nodes().nodes) == 1, what="node-3 seen")
    gone.publish_status(NodeState.OFFLINE)
    gone.close()
    wait_for(lambda: operator.nodes().nodes[0].state == "offline", what="offline")
    operator.push(bundles.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", target="node:node-3", node_timeout_s=60)
    ).rollout_id
    clock.step(3600)  # far beyond the node timeout: an offline node does not time out
    assert clock.read.wait(30), "the hub did not tick"
    # The control thread answers this request after the tick that read the clock.
    assert states(operator.rollout_status(rid)) == {"node-3": "pending"}
    back = fake_nodes("node-3", model=ref(bundles))  # a new boot; desired is retained
    info = until(operator, rid, lambda i: i.state == "completed")
    assert states(info) == {"node-3": "active"}
    assert back.model == ref(bundles, "2.0.0") and back.desired[0].rollout_id == rid


def test_a_hub_restart_resumes_the_rollout(
    hub_factory: HubFactory, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    hub = hub_factory()
    n1, n2, n3 = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    wait_for(lambda: len(n1.desired) == 1, what="canary desired")
    n1.report(n1.desired[0], UpdateState.ACTIVE, 1.0)
    wait_for(lambda: len(n2.desired) == 1 and len(n3.desired) == 1, what="wave 2")
    hub.join()
    n2.report(n2.desired[0], UpdateState.ACTIVE, 1.0)  # while the hub is down
    hub_factory()
    until(operator, rid, lambda i: states(i)["node-2"] == "active")
    assert operator.rollout_status(rid).state == "running"
    n3.report(n3.desired[0], UpdateState.ACTIVE, 1.0)
    until(operator, rid, lambda i: i.state == "completed")
    assert len(n2.desired) == 1  # confirmed desired are not written again


def test_rollback_refuses_when_a_newer_rollout_moved_the_node(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    fleet_on_v1(bundles, fake_nodes)
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    operator.push(bundles.v3)
    first = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    until(operator, first, lambda i: i.state == "completed")
    second = operator.rollout_start(RolloutStartArgs(name="toy", version="3.0.0")).rollout_id
    until(operator, second, lambda i: i.state == "completed")
    with pytest.raises(ApiFailure) as err:
        operator.rollout_verb("rollback", first)
    assert err.value.code == "conflict" and second in err.value.message
    operator.rollout_verb("rollback", second)
    info = until(operator, second, lambda i: i.state == "rolled_back")
    assert {t.previous.version for t in info.targets if t.previous} == {"2.0.0"}
