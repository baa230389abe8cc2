"""What the hub accepts from the fleet (hub/intake.py), against the real broker: a node
that floods its status and telemetry, 20 MiB of JSON, more node ids than the hub
tracks. Each is limited before it is queued, counted by reason, and the hub goes on
serving everyone else."""

from __future__ import annotations

import json
import time
from typing import Any

from cellwatch.hub.client import HubClient
from cellwatch.hub.config import HubLimits
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.intake import Intake, Item, StatusSlot
from cellwatch.hub.service import HubService
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.limits import MiB
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import Inbound, Rejected, deliver
from cellwatch.shared.schemas import ApiRequest, NodeStatus, utcnow
from tests.broker import Broker
from tests.edge import Recorder
from tests.harness import T, quiet_telemetry, wait_for
from tests.hub.conftest import HubFactory, NodeMaker

FLOOD_TELEMETRY = 3000
FLOOD_STATUS = 2000


def dropped(hub: HubService, reason: DropReason) -> int:
    return hub.counters.dropped_by_reason()[reason]


def test_a_flooding_node_is_limited_and_the_others_are_served(
    broker: Broker, hub: HubService, operator: HubClient, fake_nodes: NodeMaker
) -> None:
    flooder = broker.connect("node-1")
    since = utcnow()
    started = time.monotonic()
    for _ in range(FLOOD_TELEMETRY):
        flooder.publish(T.telemetry("node-1"), quiet_telemetry("node-1").to_json(), qos=0)
    for i in range(FLOOD_STATUS):
        status = NodeStatus(
            node_id="node-1", state="online", boot_id="f" * 32, since=since, tags=[f"n{i}"]
        )
        flooder.publish(T.status("node-1"), status.to_json(), qos=1, retain=True)
    assert flooder.publish_wait(T.telemetry("node-1"), b"", qos=1)  # all of it sent
    flood_s = time.monotonic() - started
    good = fake_nodes("node-2")  # meanwhile, a node that behaves
    wait_for(lambda: any(n.node_id == "node-2" for n in operator.nodes().nodes), what="node-2")

    # The flooder's last status is the one recorded: each newer one replaced the one
    # waiting, in its place in the queue.
    def last_recorded() -> bool:
        rec = hub.db.node("node-1")
        return rec is not None and rec.tags == [f"n{FLOOD_STATUS - 1}"]

    wait_for(last_recorded, what="the flooder's last status")
    limits = hub.settings.limits
    let_through = limits.telemetry_burst + limits.telemetry_per_s * (flood_s + 1.0)
    limited = dropped(hub, DropReason.RATE_LIMITED)
    assert limited >= FLOOD_TELEMETRY - let_through, (limited, flood_s)
    # At most one status of each node waited at a time, and the telemetry let through.
    assert hub._control.peak <= let_through + 20, (hub._control.peak, let_through)
    assert good.status().boot_id == hub.db.node("node-2").boot_id  # type: ignore[union-attr]
    assert operator.stats().fetch_errors == 0  # and the API answers


def test_twenty_mebibytes_of_json_are_dropped_unread(
    broker: Broker, hub: HubService, operator: HubClient
) -> None:
    huge = b'{"node_id": "node-1", "pad": "' + b"x" * (20 * MiB) + b'"}'
    node = broker.connect("node-1")
    for leaf in ("status", "update", "telemetry"):
        topic = f"{T.prefix}/nodes/node-1/{leaf}"
        assert node.publish_wait(topic, huge, qos=1, timeout=60), leaf
    wait_for(lambda: dropped(hub, DropReason.TOO_LARGE) == 3, what="three dropped")
    assert hub.db.node("node-1") is None  # nothing of it was read
    assert dropped(hub, DropReason.MALFORMED) == 0
    assert hub._control.peak < 10
    # An API request over its cap is answered, without its payload being queued.
    request = ApiRequest(request_id="big", args={"pad": "x" * (1 * MiB)})
    reply = operator.raw("models", json.dumps(request.model_dump(by_alias=True)).encode())
    assert not reply.ok and reply.error is not None and reply.error.code == "too_large"
    assert operator.models().models == []  # and it keeps answering


def test_no_more_node_ids_than_max_nodes(
    hub_factory: HubFactory, operator: HubClient, fake_nodes: NodeMaker
) -> None:
    hub = hub_factory(limits={"max_nodes": 2})
    for node_id in ("node-1", "node-2", "node-3"):
        fake_nodes(node_id)
    wait_for(lambda: dropped(hub, DropReason.TOO_MANY_NODES) >= 1, what="one refused")
    assert sorted(n.node_id for n in operator.nodes().nodes) == ["node-1", "node-2"]


class Unused:
    """Handlers the control thread would run (not in these unit tests)."""

    def _never(self, *args: object) -> bool:
        raise AssertionError("the control thread does not run here")

    on_status = on_telemetry = on_update = on_shadow = on_api = on_upload = _never
    on_revocations = on_site_link = on_sample_offer = on_sample_chunk = _never

    def refuse_api(self, rejected: Rejected) -> None:
        raise AssertionError("no API request here")


def rig(limits: HubLimits) -> tuple[Intake, Handoff[Item], HubCounters, list[int], Any]:
    """An intake without a broker or control thread: its queue, counters, the ids of
    the statuses acknowledged, and `status(n, boot, node_id=, payload=)` delivering one
    through the status route."""
    control: Handoff[Item] = Handoff()
    acked: list[int] = []
    counters = HubCounters()
    intake = Intake(T, limits, counters, control, Unused())
    (route,) = [r for r in intake.routes() if r.filter == T.node_filter("status")]
    since = utcnow()

    def status(n: int, boot: str, node_id: str = "node-1", payload: bytes | None = None) -> None:
        body = NodeStatus(
            node_id=node_id, state="online", boot_id=boot * 16, since=since, tags=[str(n)]
        ).to_json()
        message = Message(T.status("node-1"), payload or body, ack=lambda: acked.append(n))
        deliver(route, message, Recorder())

    return intake, control, counters, acked, status


def tags(statuses: list[Inbound[NodeStatus]]) -> list[str]:
    return [s.body.tags[0] for s in statuses]


def test_statuses_coalesce_per_node_whatever_the_process() -> None:
    """Unit level (no broker): one queue entry per node, the newest status of each of
    its last few processes in it, in the order the hub heard of them."""
    intake, control, counters, acked, status = rig(HubLimits())
    status(1, "a")
    status(2, "a")  # same process: replaces 1
    status(3, "a", payload=b"{not json")  # dropped at the edge: counted malformed
    status(4, "a", node_id="node-2")  # names another node: counted wrong_node
    status(5, "b")  # another process: in the same entry, after a's
    status(6, "c")
    status(7, "d")  # a fourth: the oldest process's (a: 2) leaves
    dropped = counters.dropped_by_reason()
    assert acked == [1, 3, 4, 2]
    assert (dropped["superseded"], dropped["malformed"], dropped["wrong_node"]) == (2, 1, 1)
    assert len(control) == 1
    slot = control.get(0)
    assert isinstance(slot, StatusSlot)
    taken = intake.take_statuses(slot)
    assert tags(taken) == ["5", "6", "7"]
    status(8, "d")  # taken: a new entry
    assert len(control) == 1
    # Given back (the database could not take them): they wait before the newer one,
    # which replaces theirs of the same process.
    intake.give_back("node-1", taken)
    assert acked == [1, 3, 4, 2, 7]
    slot = control.get(0)
    assert isinstance(slot, StatusSlot) and tags(intake.take_statuses(slot)) == ["5", "6", "8"]


def test_a_nodes_statuses_beyond_its_rate_wait_and_the_latest_is_applied() -> None:
    intake, control, counters, acked, status = rig(HubLimits(status_per_s=1.0, status_burst=2))
    for n, boot in enumerate("ab"):  # the burst: each queued at once
        status(n, boot)
        slot = control.get(0)
        assert isinstance(slot, StatusSlot)
        intake.take_statuses(slot)
    status(2, "c")  # beyond: held back, not queued
    status(3, "c")
    status(4, "d")
    assert len(control) == 0 and counters.dropped_by_reason()["rate_limited"] == 3
    assert acked == [2]  # 3 replaced it
    assert intake.release(time.monotonic()) == 0  # not yet
    assert intake.release(time.monotonic() + 1.0) == 1
    slot = control.get(0)
    assert isinstance(slot, StatusSlot) and tags(intake.take_statuses(slot)) == ["3", "4"]
