"""The ACL written by deploy/mkacl.sh, enforced by a real Mosquitto.

Under MQTT v5, Mosquitto 2.0 answers a refused QoS 1 publish with PUBACK "not
authorized" (publish_wait returns False). A subscription is always granted; the
read rules are applied to each message when it is delivered, so read tests check
what arrives.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cellwatch.shared.mqtt import Message
from cellwatch.shared.topics import Topics
from tests.broker import Broker, Inbox

T = Topics()

WRITES: dict[str, list[tuple[str, bool]]] = {
    "hub": [
        (T.desired("node-1"), True),
        (T.shadow("node-1"), True),
        (T.shadow_report("node-1"), False),
        (T.fetch_reply("node-1"), True),
        (T.hub_replies("operator", "1"), True),
        (T.hub_revoked(), True),
        (T.status("node-1"), False),
        (T.lab_images("client"), False),
        (T.hub_api("list"), False),
        (T.results("client"), False),
        (T.replies("client", "1"), False),
    ],
    "operator": [
        (T.hub_api("list"), True),
        # any lab's images, for every node or one: to clear a retained image
        (T.lab_images("client", "scope-1"), True),
        (T.node_lab_images("node-1", "client-labB", "scope-1"), True),
        (T.desired("node-1"), False),
        (T.shadow("node-1"), False),
        (T.replies("client", "1"), False),
        (T.hub_replies("operator", "1"), False),
        (T.hub_revoked(), False),
    ],
    "client": [
        # images only under its own name (DESIGN.md, Trust)
        (T.lab_images("client"), True),
        (T.lab_images("client", "scope-1"), True),
        (T.lab_images("client", "scope-1") + "/deeper", False),
        (T.lab_images("scope-1"), False),
        (T.lab_images("client-labB"), False),
        (T.lab_images("client-labB", "scope-1"), False),
        (T.node_lab_images("node-1", "client", "scope-1"), True),
        (T.node_lab_images("node-1", "client-labB"), False),
        (T.node_images("node-1"), False),  # the direct topic must name the account
        (T.node_lab_images("node-1", "client", "scope-1") + "/deeper", False),
        (T.desired("node-1"), False),
        (T.hub_api("x"), False),
        (T.results("client"), False),
        (T.status("node-1"), False),
        (T.replies("client", "1"), False),
        (T.hub_fetch("node-1"), False),
        (T.hub_revoked(), False),
    ],
    "node-1": [
        (T.status("node-1"), True),
        (T.telemetry("node-1"), True),
        (T.update("node-1"), True),
        (T.shadow_report("node-1"), True),
        (T.shadow_report("node-2"), False),
        (T.shadow("node-1"), False),
        (T.hub_fetch("node-1"), True),
        (T.hub_fetch("node-2"), False),
        ("cellwatch/hub/fetch", False),
        (T.results("client"), True),
        (T.replies("client", "req-1"), True),
        (T.status("node-2"), False),
        (T.telemetry("node-2"), False),
        (T.desired("node-1"), False),
        (T.fetch_reply("node-1"), False),
        (T.lab_images("client", "scope-1"), False),
        (T.lab_images("node-1"), False),
        (T.node_images("node-1"), False),
        (T.hub_api("x"), False),
        (T.hub_replies("operator", "1"), False),
        (T.hub_revoked(), False),
    ],
}


@pytest.mark.parametrize("user", sorted(WRITES))
def test_who_may_write_what(broker: Broker, user: str) -> None:
    client = broker.connect(user)
    wrong = [
        f"{topic}: {'refused' if allowed else 'allowed'}"
        for topic, allowed in WRITES[user]
        if client.publish_wait(topic, b"x") != allowed
    ]
    assert wrong == [], f"{user} publishing"


# Each topic, who publishes it, and who may read it (besides the publisher).
READS: list[tuple[str, str, set[str]]] = [
    (T.lab_images("client"), "client", {"node-1"}),
    (T.lab_images("client", "scope-1"), "client", {"node-1"}),
    (T.node_lab_images("node-1", "client"), "client", {"node-1"}),
    (T.node_lab_images("node-1", "client", "scope-1"), "client", {"node-1"}),
    (T.node_lab_images("node-2", "client"), "client", set()),
    # what nodes never read: no account named, or deeper than account/scope
    (T.node_images("node-1"), "operator", set()),
    (T.node_lab_images("node-1", "client", "s") + "/deeper", "operator", set()),
    (T.lab_images("client", "s") + "/deeper", "operator", set()),
    (T.results("client"), "node-1", {"operator", "client"}),
    (T.results("client-labB"), "node-1", {"operator"}),
    (T.replies("operator", "x"), "node-1", {"operator"}),
    (T.replies("client", "x"), "node-1", {"client"}),
    (T.status("node-1"), "node-1", {"hub", "operator", "client", "node-1"}),
    (T.status("node-2"), "node-2", {"hub", "operator", "client"}),
    (T.telemetry("node-1"), "node-1", {"hub"}),
    (T.update("node-1"), "node-1", {"hub"}),
    (T.shadow_report("node-1"), "node-1", {"hub"}),
    (T.shadow("node-1"), "hub", {"node-1"}),
    (T.shadow("node-2"), "hub", set()),
    (T.hub_fetch("node-1"), "node-1", {"hub"}),
    (T.hub_fetch("node-2"), "node-2", {"hub"}),
    (T.desired("node-1"), "hub", {"node-1"}),
    (T.desired("node-2"), "hub", set()),
    (T.fetch_reply("node-1"), "hub", {"node-1"}),
    (T.fetch_reply("node-2"), "hub", set()),
    (T.hub_replies("operator", "1"), "hub", {"operator"}),
    (T.hub_replies("client", "1"), "hub", set()),
    (T.hub_api("list"), "operator", {"hub"}),
    (T.hub_revoked(), "hub", {"hub", "node-1"}),
]
READERS = ("hub", "operator", "client", "node-1")


def test_who_may_read_what(broker: Broker) -> None:
    inboxes = {user: Inbox() for user in READERS}
    for user, inbox in inboxes.items():
        broker.connect(user, subscriptions=[("cellwatch/#", 1)], handler=inbox)
    publishers = {user: broker.connect(user) for user in ("hub", "operator", "client", "node-1")}
    publishers["node-2"] = broker.connect("node-2")
    for topic, publisher, _ in READS:
        assert publishers[publisher].publish_wait(topic, b"x"), f"{publisher} -> {topic}"
    # Last, one message each reader may read: when it arrives, so has everything
    # before it (one publisher's messages reach a subscriber in order).
    for user in READERS:
        assert publishers["node-1"].publish_wait(T.replies(user, "done"), b"done")
    for user, inbox in inboxes.items():
        assert inbox.wait_topic(T.replies(user, "done")), f"{user} got no end marker"
        expected = {topic for topic, _, readers in READS if user in readers}
        got = set(inbox.topics()) - {T.replies(user, "done")}
        assert got == expected, f"{user}: extra {got - expected}, missing {expected - got}"


def test_node_cannot_publish_another_nodes_status(broker: Broker) -> None:
    hub_inbox = Inbox()
    broker.connect("hub", subscriptions=[(T.node_filter("status"), 1)], handler=hub_inbox)
    node1 = broker.connect("node-1")
    assert not node1.publish_wait(T.status("node-2"), b'{"state": "forged"}', retain=True)
    assert node1.publish_wait(T.status("node-1"), b'{"state": "online"}', retain=True)
    # node-1's own status comes after the forged one: once it is here, the forged
    # one would be too.
    assert hub_inbox.wait_topic(T.status("node-1"))
    assert hub_inbox.topics() == [T.status("node-1")]
    # Nor was the forged status retained: a new subscriber gets only node-1's.
    later = Inbox()
    broker.connect("hub", subscriptions=[(T.node_filter("status"), 1)], handler=later)
    assert later.wait_topic(T.status("node-1"))
    assert later.topics() == [T.status("node-1")]


def test_node_receives_images_through_the_shared_subscription(broker: Broker) -> None:
    inbox = Inbox()
    subscriptions = [(f, 1) for f in T.lab_images_shared_filters()]
    broker.connect("node-1", subscriptions=subscriptions, handler=inbox)
    client = broker.connect("client")
    assert client.publish_wait(T.lab_images("client", "scope-1"), b"image bytes")
    assert inbox.wait_topic(T.lab_images("client", "scope-1"))
    assert [m.payload for m in inbox.messages] == [b"image bytes"]


def test_share_group_delivers_each_image_to_one_node(broker: Broker) -> None:
    everything = Inbox()
    per_node = {node: Inbox() for node in ("node-1", "node-2")}

    def handler(inbox: Inbox) -> Callable[[Message], None]:
        def handle(msg: Message) -> None:
            inbox(msg)
            everything(msg)

        return handle

    for node, inbox in per_node.items():
        subscriptions = [(f, 1) for f in T.lab_images_shared_filters()]
        broker.connect(node, subscriptions=subscriptions, handler=handler(inbox))
    client = broker.connect("client")
    sent = [f"image-{i}".encode() for i in range(10)]
    for payload in sent:
        assert client.publish_wait(T.lab_images("client"), payload)
    assert everything.wait_count(len(sent))
    assert sorted(m.payload for m in everything.messages) == sorted(sent)  # each once
    assert all(inbox.messages for inbox in per_node.values()), "one node got every image"
