"""The hub loses nothing it was told: a report whose handling failed (a database
error) waits, unacknowledged, and is applied once the database takes it; a rollout
that could not be stored leaves no trace; a retained desired model the broker lost
(killed before its autosave) is written again when the node comes back; bytes served
survive a hub restart."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.counters import DropReason
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.rollout import Rollout
from cellwatch.hub.service import HubService
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.states import UpdateState
from tests.broker import Broker
from tests.harness import wait_for
from tests.helpers.rollouts import fleet_on_v1, ref, seen_by_hub, states, until
from tests.hub.conftest import Bundles, HubFactory, NodeMaker


class FailingSaves:
    """hub.db.save_rollout raising `database is locked` the next `times` calls."""

    def __init__(self, hub: HubService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.times = 0
        self.failed = 0
        save = hub.db.save_rollout

        def flaky(r: Rollout, *args: Any, **kwargs: Any) -> None:
            if self.times > 0:
                self.times -= 1
                self.failed += 1
                raise sqlite3.OperationalError("database is locked")
            save(r, *args, **kwargs)

        monkeypatch.setattr(hub.db, "save_rollout", flaky)


def test_a_report_is_acknowledged_only_once_it_was_handled(
    hub: HubService,
    operator: HubClient,
    bundles: Bundles,
    fake_nodes: NodeMaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n1, n2, _ = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", waves="1,2,100%")
    ).rollout_id
    wait_for(lambda: len(n1.desired) == 1, what="canary desired")
    saves = FailingSaves(hub, monkeypatch)
    saves.times = 2  # the database is busy twice, then fine
    n1.report(n1.desired[0], UpdateState.ACTIVE, 1.0)
    until(operator, rid, lambda i: states(i)["node-1"] == "active")
    assert saves.failed == 2
    wait_for(lambda: len(n2.desired) == 1, what="wave 2")  # the rollout went on

    saves.times = 100  # the database keeps failing: the report waits, the hub goes on
    n2.report(n2.desired[0], UpdateState.DOWNLOADING, 0.5)
    wait_for(lambda: saves.failed >= 4, 30, "the report tried again")
    assert states(operator.rollout_status(rid))["node-2"] == "pending"  # as stored
    n2.report(n2.desired[0], UpdateState.ACTIVE, 1.0)  # waits behind it
    saves.times = 0
    until(operator, rid, lambda i: states(i)["node-2"] == "active")
    assert hub.counters.dropped_by_reason()[DropReason.HANDLING_FAILED] == 0


def test_a_rollout_that_cannot_be_stored_leaves_no_trace(
    hub: HubService,
    operator: HubClient,
    bundles: Bundles,
    fake_nodes: NodeMaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n1, _, _ = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    saves = FailingSaves(hub, monkeypatch)
    saves.times = 1
    with pytest.raises(ApiFailure) as err:
        operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0"))
    assert err.value.code == "internal"
    assert hub.orchestrator.active == {} and operator.rollout_list().rollouts == []
    assert n1.desired == []  # nothing was written either
    info = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0"))
    assert info.state == "running"
    wait_for(lambda: len(n1.desired) == 1, what="the canary's desired")


def test_a_desired_model_the_broker_lost_is_written_again_when_the_node_returns(
    broker: Broker,
    hub: HubService,
    operator: HubClient,
    bundles: Bundles,
    fake_nodes: NodeMaker,
) -> None:
    node = fake_nodes("node-1", model=ref(bundles), behaviour="manual")
    seen_by_hub(operator, 1)
    operator.push(bundles.v2)
    broker.stop()  # saved now (clean shutdown): node-1's status, the hub's session
    broker.start()
    wait_for(lambda: hub.mqtt.connected and node.mqtt.connected, what="reconnected")
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", target="node:node-1")
    ).rollout_id
    wait_for(lambda: len(node.desired) == 1, what="desired")
    issued = node.desired[0]
    node.close()
    broker.kill()  # before its autosave: the retained desired is gone
    broker.start()
    wait_for(lambda: hub.mqtt.connected, what="the hub reconnected")
    back = fake_nodes("node-1", model=ref(bundles), behaviour="manual")  # a new boot
    wait_for(lambda: len(back.desired) == 1, 30, "desired written again")
    assert back.desired[0] == issued  # the same message: a node at work on it goes on
    back.report(back.desired[0], UpdateState.ACTIVE, 1.0)
    until(operator, rid, lambda i: i.state == "completed")


def test_bytes_served_survive_a_hub_restart(
    hub_factory: HubFactory, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    hub = hub_factory()
    fleet_on_v1(bundles, fake_nodes)
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    until(operator, rid, lambda i: i.state == "completed")
    before = operator.stats()
    size = sum(p.stat().st_size for p in bundles.v2.iterdir())
    assert before.bytes_served == 3 * size
    hub.join()
    hub_factory()
    after = operator.stats()
    assert after.bytes_by_node_bundle == before.bytes_by_node_bundle
    assert after.fetch_requests == 0  # those count per process
    assert {n.node_id: n.bytes_served for n in operator.nodes().nodes} == before.bytes_by_node
