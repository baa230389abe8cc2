"""A Result's source is authenticated: a lab publishes images only under a topic
naming itself (the broker's ACL, deploy/mkacl.sh), so lab A cannot send an image
"from" lab B and make its Result appear on `results/client-labB`.

(The other half, a node answering only on Response Topics under the sender's own
`replies/{account}/`, lives in the node: issue 17, phase 2.)"""

from __future__ import annotations

from cellwatch.shared.mqtt import PublishProps
from cellwatch.shared.schemas import NodeStatus, Result
from tests import images
from tests.broker import Broker
from tests.harness import Collector, T, wait_for
from tests.security.stack import Stack

NAME = "Im001_1"
"""ALL-IDB's file names are the same in every lab."""


def test_a_lab_cannot_publish_an_image_as_another_lab(stack: Stack, lab_broker: Broker) -> None:
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
    lab_b = Collector(
        lab_broker.settings("client-labB"),
        T.results("client-labB"),
        T.replies("client-labB", "#"),
        name="labB",
    )
    own = Collector(lab_broker.settings("client-labA"), T.results("client-labA"), name="labA")
    attacker = lab_broker.connect("client-labA")
    as_b = PublishProps(user=[("image_id", NAME)])
    for topic in (
        T.lab_images("client-labB"),
        T.lab_images("client-labB", "scope-1"),
        T.node_lab_images("node-1", "client-labB"),
    ):
        assert not attacker.publish_wait(topic, images.jpeg(images.BLUE), props=as_b), topic
    # Its own image of the same name is answered, to its own results topic.
    assert attacker.publish_wait(T.lab_images("client-labA", "scope-1"), images.jpeg(), props=as_b)
    wait_for(lambda: bool(own.messages), 30, "lab A's own Result")
    mine = Result.model_validate_json(own.messages[0].payload)
    assert mine.image_id == NAME and mine.source == "client-labA"

    # Lab B's own image: the only Result lab B ever sees.
    victim = lab_broker.connect("client-labB")
    assert victim.publish_wait(T.lab_images("client-labB"), images.jpeg(images.RED), props=as_b)
    wait_for(lambda: bool(lab_b.messages), 30, "lab B's own Result")
    node.stop()  # everything the node had is answered before it exits
    results = [Result.model_validate_json(m.payload) for m in lab_b.messages]
    assert [(r.source, r.label) for r in results] == [("client-labB", "ALL")]
    for c in (status, lab_b, own):
        c.close()
