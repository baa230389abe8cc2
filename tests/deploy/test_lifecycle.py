"""Broker restarts (persistence) and adding a node to a running broker (SIGHUP)."""

from __future__ import annotations

from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.topics import Topics
from tests.broker import Broker, Inbox, sync

T = Topics()


def test_restart_keeps_retained_messages_and_queued_images(broker: Broker) -> None:
    hub = broker.connect("hub")
    assert hub.publish_wait(T.desired("node-1"), b'{"version": "1.0.0"}', retain=True)
    # node-1 joins with a persistent session, then goes away.
    node = broker.connect(
        "node-1",
        client_id="node-1",
        clean_start=False,
        subscriptions=[(T.node_lab_images_filters("node-1")[0], 1)],
    )
    node.disconnect()
    client = broker.connect("client")
    for i in range(3):
        assert client.publish_wait(T.node_lab_images("node-1", "client"), f"image-{i}".encode())
    broker.close_clients()

    broker.restart()

    inbox = Inbox()
    node = MqttClient(broker.settings("node-1"), client_id="node-1", clean_start=False)
    node.set_message_handler(inbox)
    node.connect()
    try:
        assert inbox.wait_count(3), "the queued images did not survive the restart"
        assert [m.payload for m in inbox.messages] == [b"image-0", b"image-1", b"image-2"]
        node.subscribe(T.desired("node-1"))
        sync(node)
        assert inbox.wait_topic(T.desired("node-1")), "the retained desired model is gone"
        assert inbox.messages[-1].payload == b'{"version": "1.0.0"}'
    finally:
        node.disconnect()


def test_add_node_to_a_running_broker(broker: Broker) -> None:
    hub_inbox = Inbox()
    broker.connect("hub", subscriptions=[(T.node_filter("status"), 1)], handler=hub_inbox)
    node1 = broker.connect("node-1")

    broker.add_node("node-4")

    assert "node-4" in broker.nodes
    node4 = broker.connect("node-4")
    assert node4.publish_wait(T.status("node-4"), b"online")
    assert not node4.publish_wait(T.status("node-1"), b"forged")
    # Connections made before the reload keep working under the new ACL.
    assert node1.publish_wait(T.status("node-1"), b"still here")
    assert hub_inbox.wait_topic(T.status("node-1"))
    assert [(m.topic, m.payload) for m in hub_inbox.messages] == [
        (T.status("node-4"), b"online"),
        (T.status("node-1"), b"still here"),
    ]
    # The other nodes' users and rules are still there.
    assert broker.connect("node-2").publish_wait(T.status("node-2"), b"online")
