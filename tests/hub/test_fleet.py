"""Fleet tracking from retained status, telemetry and reports."""

from __future__ import annotations

from cellwatch.hub.client import HubClient
from cellwatch.hub.service import HubService
from cellwatch.shared.schemas import ModelRef, NodeStatus
from tests.broker import Broker
from tests.harness import Collector, T, wait_for
from tests.hub.conftest import NodeMaker

V1 = ModelRef(name="toy", version="1.0.0", sha256="a" * 64)


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
    before = hub.db.node("node-1")
    assert before is not None
    new.publish_status()
    wait_for(lambda: (hub.db.node("node-1") or before).last_seen != before.last_seen)
    assert node_state(operator, "node-1") == ("online", new.boot_id)
    new.publish_status("offline")  # the current boot going offline does count
    wait_for(lambda: node_state(operator, "node-1") == ("offline", new.boot_id), what="offline")
    assert operator.nodes().nodes[0].model == V1  # the model last known is kept
