"""Crash counts are keyed on content, scoped to the sender (issue 17, the third
attack): lab A's image named Im001_1 crashes the node twice, and then lab B's
different image of the same name is answered as any image, not `poison_image`.

The crash is the fault seam's `crash_image` (the node kills itself when it starts
decoding an image of that id: a decoder bug). Lab A publishes at QoS 0, so its image
is not delivered again after a crash: nothing answers it, and the crash count it
leaves in the node's journal stays (what a lab that gives up, or an expired image,
leaves behind). The node is then started without the fault, as after a fix."""

from __future__ import annotations

from cellwatch.node.faults import ENV_VAR
from cellwatch.shared.mqtt import PublishProps
from cellwatch.shared.schemas import Result
from tests import images
from tests.broker import Broker
from tests.harness import Collector, T, wait_for
from tests.security.stack import Boots, Stack

NAME = "Im001_1"
"""ALL-IDB's file names are the same in every lab."""


def test_another_labs_image_of_the_same_name_is_never_poison(
    stack: Stack, lab_broker: Broker
) -> None:
    node = stack.node("node-1")
    node.env[ENV_VAR] = f"crash_image={NAME}"
    boots = Boots(lab_broker, "node-1")
    attacker = lab_broker.connect("client-labA")
    poison = images.jpeg(images.BLUE)
    named = PublishProps(user=[("image_id", NAME)])
    for crash in (1, 2):  # the first try, then the one retry (alone)
        node.start()
        boots.wait_online(crash)
        attacker.publish(T.lab_images("client-labA"), poison, qos=0, props=named)
        assert node.wait() == -9, node.text()  # SIGKILL: the crash_image fault
    assert "retrying it alone" in node.text()

    del node.env[ENV_VAR]
    node.start()
    boots.wait_online(3)
    lab_b = Collector(lab_broker.settings("client-labB"), T.results("client-labB"), name="labB")
    lab_a = Collector(lab_broker.settings("client-labA"), T.results("client-labA"), name="labA")
    victim = lab_broker.connect("client-labB")
    assert victim.publish_wait(T.lab_images("client-labB"), images.jpeg(images.RED), props=named)
    # The image that crashed the node, from the lab that sent it, is still poison.
    assert attacker.publish_wait(T.lab_images("client-labA"), poison, props=named)
    wait_for(lambda: bool(lab_b.messages) and bool(lab_a.messages), 60, "both Results")
    (theirs,) = [Result.model_validate_json(m.payload) for m in lab_b.messages]
    assert (theirs.image_id, theirs.status, theirs.label) == (NAME, "ok", "ALL"), theirs.error
    (again,) = [Result.model_validate_json(m.payload) for m in lab_a.messages]
    assert again.error is not None and again.error.code == "poison_image"
    # And it stays so (a lab client's retry, a resend): the node is not tried again.
    assert attacker.publish_wait(T.lab_images("client-labA"), poison, props=named)
    wait_for(lambda: len(lab_a.messages) == 2, 60, "the second answer")
    last = Result.model_validate_json(lab_a.messages[1].payload)
    assert last.error is not None and last.error.code == "poison_image"
    assert node.running
    for c in (boots, lab_a, lab_b):
        c.close()
