"""A Result's source is authenticated (issue 17, the second attack): lab A cannot make a
Result appear on lab B's topics.

- A lab publishes images only under a topic naming itself (the broker's ACL,
  deploy/mkacl.sh), so lab A cannot send an image "from" lab B and have its Result
  go to `results/client-labB`.
- A node answers an image only on a Response Topic under `replies/{the account its
  topic names}/`, otherwise on `results/{that account}` (node/requests.py), so lab A
  cannot have the Result of its own image sent to lab B's reply topic either: it gets
  `invalid_request` on its own results topic instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cellwatch.shared.mqtt import PublishProps
from cellwatch.shared.schemas import NodeStatus, Result
from tests import images
from tests.broker import Broker
from tests.harness import Collector, T, wait_for
from tests.security.stack import Stack

NAME = "Im001_1"
"""ALL-IDB's file names are the same in every lab."""


def results(c: Collector) -> list[Result]:
    return [Result.model_validate_json(m.payload) for m in c.messages]


@pytest.fixture
def watched(stack: Stack, lab_broker: Broker) -> Iterator[tuple[Collector, Collector]]:
    """node-1 running; what lab B and lab A receive on all their topics."""
    node = stack.node("node-1")
    status = Collector(lab_broker.settings("operator"), T.status("node-1"), name="status")
    node.start()
    wait_for(
        lambda: any(
            NodeStatus.model_validate_json(m.payload).state == "online" for m in status.messages
        ),
        60,
        "node-1 online",
    )
    status.close()
    lab_b = Collector(
        lab_broker.settings("client-labB"),
        T.results("client-labB"),
        T.replies("client-labB", "#"),
        name="labB",
    )
    lab_a = Collector(
        lab_broker.settings("client-labA"),
        T.results("client-labA"),
        T.replies("client-labA", "#"),
        name="labA",
    )
    try:
        yield lab_b, lab_a
    finally:
        lab_b.close()
        lab_a.close()


def lab_b_sends_its_own(lab_broker: Broker, lab_b: Collector) -> None:
    """Lab B's own image, after the attack: when its Result is in, anything the node
    sent lab B before is in too (one publisher's messages arrive in order)."""
    victim = lab_broker.connect("client-labB")
    props = PublishProps(user=[("image_id", NAME)])
    assert victim.publish_wait(T.lab_images("client-labB"), images.jpeg(images.RED), props=props)
    wait_for(lambda: bool(lab_b.messages), 30, "lab B's own Result")


def test_a_lab_cannot_publish_an_image_as_another_lab(
    watched: tuple[Collector, Collector], lab_broker: Broker
) -> None:
    lab_b, lab_a = watched
    attacker = lab_broker.connect("client-labA")
    as_b = PublishProps(user=[("image_id", NAME)])
    for topic in (
        T.lab_images("client-labB"),
        T.lab_images("client-labB", "scope-1"),
        T.node_lab_images("node-1", "client-labB"),
        T.node_lab_images("node-1", "client-labB", "scope-1"),
        T.node_images("node-1"),  # names no account: no node would know whom to answer
    ):
        assert not attacker.publish_wait(topic, images.jpeg(images.BLUE), props=as_b), topic
    # Its own image of the same name is answered, to its own results topic.
    assert attacker.publish_wait(T.lab_images("client-labA", "scope-1"), images.jpeg(), props=as_b)
    wait_for(lambda: bool(lab_a.messages), 30, "lab A's own Result")
    (mine,) = results(lab_a)
    assert (mine.image_id, mine.source, mine.scope) == (NAME, "client-labA", "scope-1")

    lab_b_sends_its_own(lab_broker, lab_b)
    assert [(r.source, r.label) for r in results(lab_b)] == [("client-labB", "ALL")]


def test_a_lab_cannot_have_its_result_sent_to_another_labs_reply_topic(
    watched: tuple[Collector, Collector], lab_broker: Broker
) -> None:
    lab_b, lab_a = watched
    attacker = lab_broker.connect("client-labA")
    forged = [T.replies("client-labB", "a1b2c3"), T.results("client-labB")]
    sent = 0
    for topic in (T.lab_images("client-labA"), T.node_lab_images("node-1", "client-labA", "s")):
        for rt in forged:
            props = PublishProps(
                response_topic=rt, correlation_data=b"forged", user=[("image_id", NAME)]
            )
            assert attacker.publish_wait(topic, images.jpeg(images.BLUE), props=props)
            sent += 1
    wait_for(lambda: len(lab_a.messages) + len(lab_b.messages) == sent, 30, "the answers")
    assert lab_b.messages == []
    for m in lab_a.messages:  # each refused, to lab A's own results topic
        r = Result.model_validate_json(m.payload)
        assert m.topic == T.results("client-labA") and r.source == "client-labA"
        assert r.error is not None and r.error.code == "invalid_request"
        assert "replies/client-labA/" in r.error.message

    lab_b_sends_its_own(lab_broker, lab_b)
    assert [(m.topic, Result.model_validate_json(m.payload).label) for m in lab_b.messages] == [
        (T.results("client-labB"), "ALL")
    ]
