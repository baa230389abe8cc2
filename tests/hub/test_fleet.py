"""Fleet tracking from retained status, telemetry and reports."""

from __future__ import annotations

from pathlib import Path

from cellwatch.hub.client import HubClient
from cellwatch.hub.db import Database
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.service import HubService
from cellwatch.shared.schemas import ModelRef, NodeStatus, utcnow
from cellwatch.shared.states import NodeState
from tests.broker import Broker
from tests.harness import Collector, T, quiet_telemetry, wait_for
from tests.hub.conftest import NodeMaker

V1 = ModelRef(name="toy", version="1.0.0", manifest_sha256="a" * 64)


def node_state(operator: HubClient, node_id: str) -> tuple[str, str | None]:
    for n in operator.nodes().nodes:
        if n.node_id == node_id:
            return n.state, n.boot_id
    return "unknown", None


def test_status_tags_and_a_stale_will_is_ignored(
    broker: Broker, hub: HubService, operator: HubClient, fake_nodes: NodeMaker
) -> None:
    old = fake_nodes("node-1", model=V1, tags=("ward-a",))
    wait_for(lambda: node_state(operator, "node-1") == ("online", old.boot_id), what="online")
    info = operator.nodes().nodes[0]
    assert info.model == V1 and info.tags == ["ward-a"] and info.device == "CPU"
    new = fake_nodes("node-1", model=V1)  # the node restarted: a new boot, a newer `since`
    wait_for(lambda: node_state(operator, "node-1") == ("online", new.boot_id), what="new boot")
    watch = Collector(broker.settings("client"), T.status("node-1"), name="watch")
    old.crash()  # the broker now publishes the OLD process's Will (retained, offline)

    def will_seen() -> bool:
        statuses = [NodeStatus.model_validate_json(m.payload) for m in watch.messages]
        return any(s.boot_id == old.boot_id and s.state == "offline" for s in statuses)

    wait_for(will_seen, what="the old boot's Will")
    watch.close()
    # The hub had the Will queued before this marker: once the marker is in, so was it.
    # The marker is telemetry, which changes last_seen and nothing else: had the hub
    # taken the Will, the node would now be offline with the old boot.
    before = hub.db.node("node-1")
    assert before is not None
    marker = quiet_telemetry("node-1")
    assert new.mqtt.publish_wait(T.telemetry("node-1"), marker.to_json(), qos=1)
    wait_for(lambda: (hub.db.node("node-1") or before).telemetry is not None, what="marker")
    assert node_state(operator, "node-1") == ("online", new.boot_id)
    new.publish_status(NodeState.OFFLINE)  # the current boot going offline does count
    wait_for(lambda: node_state(operator, "node-1") == ("offline", new.boot_id), what="offline")
    assert operator.nodes().nodes[0].model == V1  # the model last known is kept


def test_two_processes_with_one_node_id_show_as_conflict(
    hub: HubService, operator: HubClient, fake_nodes: NodeMaker
) -> None:
    """What the hub sees when a second process runs with a node's id (each takes the
    broker session from the other): the older process says `online` again after the
    newer one did. A restart never does that, a late Will is `offline`."""
    older = fake_nodes("node-1", model=V1)
    wait_for(lambda: node_state(operator, "node-1") == ("online", older.boot_id), what="online")
    newer = fake_nodes("node-1", model=V1)
    wait_for(lambda: node_state(operator, "node-1") == ("online", newer.boot_id), what="newer")
    older.publish_status()  # back after taking the session from the newer one
    wait_for(lambda: node_state(operator, "node-1")[0] == "conflict", what="conflict")
    assert node_state(operator, "node-1") == ("conflict", newer.boot_id)
    newer.publish_status()  # the newer one reconnects in turn: still a conflict
    older.crash()  # its Will (offline, the older boot) changes nothing either
    before = hub.db.node("node-1")
    assert before is not None
    newer.publish_status()
    wait_for(lambda: (hub.db.node("node-1") or before).last_seen != before.last_seen)
    assert node_state(operator, "node-1")[0] == "conflict"


def test_conflict_clears_after_the_hold_time() -> None:
    from cellwatch.hub.fleet import node_state as state_of
    from cellwatch.hub.records import NodeRecord
    from cellwatch.shared.limits import CONFLICT_HOLD_S

    rec = NodeRecord("node-1", state=NodeState.ONLINE, last_seen=1000.0, conflict_at=1000.0)
    assert state_of(rec, 1001.0) == "conflict"
    rec.last_seen = 1000.0 + CONFLICT_HOLD_S
    assert state_of(rec, 1001.0 + CONFLICT_HOLD_S) == "online"
    rec.state = NodeState.OFFLINE
    assert state_of(rec, 1001.0) == "offline"  # both stopped: offline wins


def test_telemetry_is_written_in_one_transaction_per_flush(tmp_path: Path) -> None:
    """A known node's telemetry reaches the database at the next flush (each control
    tick): one commit for the whole fleet's, not one per message."""
    db = Database(tmp_path / "hub.db")
    fleet = Fleet(db)
    ids = [f"node-{i}" for i in range(20)]
    for node_id in ids:
        status = NodeStatus(
            node_id=node_id, state=NodeState.ONLINE, boot_id="boot-0001", since=utcnow(), model=V1
        )
        assert fleet.on_status(status, now=100.0)
    commits = db.commits
    for i in range(3):  # three rounds of the fleet's telemetry
        for node_id in ids:
            assert fleet.on_telemetry(quiet_telemetry(node_id, rss_mb=10.0 + i), now=200.0 + i)
    assert db.commits == commits  # nothing written yet
    stored = db.node("node-3")
    assert stored is not None and stored.telemetry is None and stored.last_seen == 100.0
    assert fleet.flush() == 20
    assert db.commits == commits + 1
    stored = db.node("node-3")
    assert stored is not None and stored.telemetry is not None
    assert (stored.telemetry["rss_mb"], stored.last_seen) == (12.0, 202.0)
    assert fleet.flush() == 0 and db.commits == commits + 1
    # A node the hub hears of first by its telemetry is written at once.
    assert fleet.on_telemetry(quiet_telemetry("node-new"), now=300.0)
    assert db.node("node-new") is not None
    db.close()
