"""The hub stays bounded (issue 17): a node (or whoever has its password) that floods
the hub with statuses, each with a new boot_id, costs it one queue entry and a few
log lines, and the operator is answered meanwhile; a database another process holds
locked stalls nothing for long and loses no status. A real `cellwatch-hub serve`
process each time (`python bench/flood.py` measures the flood of 20,000)."""

from __future__ import annotations

import sqlite3
import uuid

from prometheus_client.parser import text_string_to_metric_families

from cellwatch.hub.client import HubClient
from cellwatch.hub.config import OperatorSettings
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.schemas import NodeStatus, utcnow
from tests.broker import Broker
from tests.harness import T, wait_for
from tests.hub.web import get
from tests.security.stack import Process, Stack

FLOOD = 2000
OPERATOR_TIMEOUT_S: float = OperatorSettings.model_fields["timeout_s"].default


def hub_metrics(hub: Process) -> dict[str, float]:
    reply = get(f"http://127.0.0.1:{hub.http_port}/", "/metrics")
    assert reply.status == 200, reply
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            key = s.name + "".join(f",{v}" for _, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def started(stack: Stack, lab_broker: Broker) -> tuple[Process, HubClient]:
    hub = stack.hub(stack.work / "hub")
    hub.start()
    wait_for(lambda: "hub: serving" in hub.text(), 60, "the hub serving")
    operator = HubClient(lab_broker.settings("operator"), timeout_s=60)
    operator.connect()
    return hub, operator


def send_statuses(node: MqttClient, tags: list[str]) -> None:
    """node-1's statuses, each of another process (boot_id), then a marker: once the
    broker acknowledged it, it has every status before it."""
    since = utcnow()
    for tag in tags:
        status = NodeStatus(
            node_id="node-1", state="online", boot_id=uuid.uuid4().hex, since=since, tags=[tag]
        )
        node.publish(T.status("node-1"), status.to_json(), qos=1, retain=True)
    assert node.publish_wait(T.update("node-1"), b"", qos=1, timeout=120)


def recorded(operator: HubClient, tag: str) -> bool:
    return any(n.node_id == "node-1" and n.tags == [tag] for n in operator.nodes().nodes)


def test_a_node_flooding_statuses_costs_the_hub_one_queue_entry(
    stack: Stack, lab_broker: Broker
) -> None:
    hub, operator = started(stack, lab_broker)
    lines_before = len(hub.text().splitlines())
    flooder = lab_broker.connect("node-1")
    tags = [f"n{i}" for i in range(FLOOD)]
    send_statuses(flooder, tags)
    assert operator.nodes() is not None  # the operator is answered
    wait_for(lambda: recorded(operator, tags[-1]), 60, "the flood's last status recorded")
    m = hub_metrics(hub)
    # One entry per node in the control queue, whatever the boot_ids (without it, one
    # per status: over a thousand here).
    assert m["cellwatch_hub_control_queue_peak"] <= 3, m["cellwatch_hub_control_queue_peak"]
    assert m["cellwatch_hub_messages_dropped_total,rate_limited"] > FLOOD / 2
    log = hub.text().splitlines()[lines_before:]
    assert len(log) < FLOOD / 20, "\n".join(log[:50])  # not a line per status
    warnings = [line for line in log if "sends faster than the hub's limits allow" in line]
    assert len(warnings) == 1, warnings  # one per minute
    operator.close()


def test_a_locked_database_stalls_nothing_for_long_and_loses_no_status(
    stack: Stack, lab_broker: Broker
) -> None:
    hub, operator = started(stack, lab_broker)
    node = lab_broker.connect("node-1")
    send_statuses(node, ["before"])
    wait_for(lambda: recorded(operator, "before"), 60, "the first status recorded")
    # The operator commands' default patience (10 s): a command is answered while the
    # lock is held, the hub does not wait out each status's busy timeouts in turn.
    impatient = HubClient(lab_broker.settings("operator"), timeout_s=OPERATOR_TIMEOUT_S)
    impatient.connect()
    locker = sqlite3.connect(stack.work / "hub" / "hub.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        send_statuses(node, [f"locked-{i}" for i in range(5)])
        for _ in range(3):
            assert not recorded(impatient, "locked-4")
        assert "cannot write the database" in hub.text()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # The lock is gone: the latest status is applied, none was dropped.
    wait_for(lambda: recorded(operator, "locked-4"), 90, "the latest status applied")
    assert hub_metrics(hub)["cellwatch_hub_messages_dropped_total,handling_failed"] == 0
    assert "database is writable again" in hub.text()
    impatient.close()
    operator.close()
