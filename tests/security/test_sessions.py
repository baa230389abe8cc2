"""Sessions belong to their account: a lab that logs in with the client id of the hub
or of a node does not take over their session (deploy/PRODUCTION.md, threat model).

Mosquitto 2.0 lets any account log in with any client id and closes the connection
that held it. The hub's and the nodes' client ids therefore carry a secret derived
from their password (MqttSettings.session_client_id): the ids a lab could know or
guess (`cellwatch-hub`, `cellwatch-node-{node_id}`) are nobody's."""

from __future__ import annotations

from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.schemas import NodeStatus
from cellwatch.shared.settings import client_log_name
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.security.stack import Stack, connections

ROUNDS = 10
TAKEOVER = "already connected, closing old connection"


def test_a_lab_cannot_take_over_the_session_of_the_hub_or_a_node(
    stack: Stack, lab_broker: Broker
) -> None:
    hub = stack.hub(stack.work / "hub")
    node = stack.node("node-1")
    watch = Collector(lab_broker.settings("operator"), T.status("node-1"), name="watch")
    hub.start()
    node.start()

    def online() -> bool:
        statuses = [NodeStatus.model_validate_json(m.payload) for m in watch.messages]
        return bool(statuses) and statuses[-1].state == "online"

    wait_for(online, 60, "node-1 online")
    wait_for(lambda: connections(lab_broker, "hub") == 1, 60, "the hub connected")

    # The attack of issue 17: lab A logs in again and again with every client id it
    # could know, as a persistent session (clean start off) and as a fresh one.
    for round_ in range(ROUNDS):
        for client_id in ("cellwatch-hub", "cellwatch-node-node-1"):
            lab = MqttClient(
                lab_broker.settings("client-labA"),
                client_id=client_id,
                clean_start=round_ % 2 == 0,
            )
            lab.connect()
            lab.disconnect()

    # The broker logs a takeover before it answers the newcomer's CONNECT: none.
    log = lab_broker.log_text()
    assert TAKEOVER not in log, [line for line in log.splitlines() if TAKEOVER in line]
    labs = lab_broker.settings("client-labB")
    requester = Requester(labs, user="client-labB")
    try:
        answers = [requester.send(images.jpeg(), source="client-labB") for _ in range(10)]
        assert all(requester.result(a).status == "ok" for a in answers)
    finally:
        requester.close()
    assert connections(lab_broker, "hub") == 1 and connections(lab_broker, "node-1") == 1
    assert hub.running and node.running
    assert "taken over" not in node.text() and "took our session" not in node.text()
    # Nor do their logs give the ids away: they name them without the secret part.
    for proc, user, base in (
        (hub, "hub", "cellwatch-hub"),
        (node, "node-1", "cellwatch-node-node-1"),
    ):
        secret_id = lab_broker.settings(user).session_client_id(base)
        assert secret_id not in proc.text()
        assert f"{client_log_name(secret_id)}: connected to" in proc.text()
    watch.close()
