"""The hub trusts its own clock: a node whose clock is a day behind (its `since` says
so) is shown online after a restart, not as a `conflict` of two processes and
offline, because the hub orders a node's processes by the order it heard of them
(hub/fleet.py). The node here is scripted (its clock is what the test says), the hub
is a real process."""

from __future__ import annotations

from datetime import timedelta

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import HubError
from cellwatch.shared.schemas import ModelRef
from tests.broker import Broker
from tests.harness import wait_for
from tests.hub.scripted_nodes import FakeNode
from tests.security.stack import Stack

V1 = ModelRef(name="toy", version="1.0.0", manifest_sha256="a" * 64)


def shown(operator: HubClient) -> tuple[str, str | None]:
    nodes = operator.nodes().nodes
    return (nodes[0].state, nodes[0].boot_id) if nodes else ("unknown", None)


def test_a_node_whose_clock_is_a_day_behind_is_online(stack: Stack, lab_broker: Broker) -> None:
    hub = stack.hub(stack.work / "hub")
    hub.start()
    operator = HubClient(lab_broker.settings("operator"), timeout_s=5)
    operator.connect()
    wait_for(lambda: answering(operator), 60, "the hub answering")
    first = FakeNode(lab_broker.settings("node-1"), "node-1", model=V1)
    wait_for(lambda: shown(operator) == ("online", first.boot_id), 30, "the first boot")
    first.crash()  # its Will: offline
    wait_for(lambda: shown(operator) == ("offline", first.boot_id), 30, "the Will")

    # The node comes back with its clock a day behind: its `since` is older.
    second = FakeNode(lab_broker.settings("node-1"), "node-1", model=V1, connect=False)
    second.since = first.since - timedelta(days=1)
    second.connect()
    wait_for(lambda: shown(operator)[1] == second.boot_id, 30, "the second boot")
    assert shown(operator) == ("online", second.boot_id)

    # A restarted hub reads the retained status again: still the same.
    operator.close()
    assert hub.stop() == 0
    hub.start()
    operator = HubClient(lab_broker.settings("operator"), timeout_s=5)
    operator.connect()
    wait_for(lambda: answering(operator), 60, "the hub answering again")
    second.publish_status()
    wait_for(lambda: shown(operator) == ("online", second.boot_id), 30, "online after restart")
    operator.close()
    second.close()


def answering(operator: HubClient) -> bool:
    """True once the hub answers (its process may still be starting)."""
    try:
        operator.nodes()
    except HubError:
        return False
    return True
