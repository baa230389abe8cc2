"""Retained images (issue 17, the sixth attack): a lab stores images in the broker by
publishing them with the retain flag. Mosquitto 2.0 cannot refuse the flag for some
topics or accounts (deploy/README.md; `python bench/retained.py` measures what it
costs the broker), so the nodes detect them and the hub reports them: each node
answers such an image once, when it is published, acknowledges every replay without
a Result, logs the topic and the operator's command that clears it, and counts the
replays in its telemetry, which the hub shows on its fleet page and in /metrics. The
operator's one-line remedy (an empty retained message on the topic) ends it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cellwatch.shared.mqtt import PublishProps
from cellwatch.shared.schemas import Telemetry
from tests import images
from tests.broker import Broker
from tests.harness import Collector, T, wait_for
from tests.hub.web import get
from tests.security.stack import Boots, Process, Stack

SCOPES = ("scope-1", "scope-2", "scope-3")


def retained_metric(hub: Process) -> float | None:
    """cellwatch_node_retained_images_total of node-1 on the hub's /metrics."""
    reply = get(f"http://127.0.0.1:{hub.http_port}/", "/metrics")
    assert reply.status == 200, reply
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            if s.name == "cellwatch_node_retained_images_total" and s.labels["node_id"] == "node-1":
                return float(s.value)
    return None


def last_telemetry(c: Collector, after: int) -> Telemetry | None:
    ts = [Telemetry.model_validate_json(m.payload) for m in c.messages[after:]]
    return ts[-1] if ts else None


def test_retained_images_are_answered_once_and_reported(stack: Stack, lab_broker: Broker) -> None:
    hub = stack.hub(stack.work / "hub")
    node = stack.node("node-1")
    boots = Boots(lab_broker, "node-1")
    telemetry = Collector(lab_broker.settings("hub"), T.telemetry("node-1"), name="tm")
    results = Collector(lab_broker.settings("client-labA"), T.results("client-labA"), name="a")
    hub.start()
    node.start()
    boots.wait_online(1)
    lab = lab_broker.connect("client-labA")
    for scope in SCOPES:
        topic = T.lab_images("client-labA", scope)
        props = PublishProps(user=[("image_id", scope)])
        assert lab.publish_wait(topic, images.jpeg(), retain=True, props=props)
    wait_for(lambda: len(results.messages) == len(SCOPES), 30, "each answered when published")

    # A restart subscribes again: the broker replays what it stored.
    assert node.stop() == 0
    since = len(telemetry.messages)
    node.start()
    boots.wait_online(2)

    def reported(count: int) -> bool:
        t = last_telemetry(telemetry, since)
        return t is not None and t.retained_images == count

    wait_for(lambda: reported(len(SCOPES)), 60, "the node's telemetry counting the replays")
    wait_for(lambda: retained_metric(hub) == len(SCOPES), 60, "the hub's metric")
    page = get(f"http://127.0.0.1:{hub.http_port}/").text
    assert f'data-retained="{len(SCOPES)}"' in page
    log = node.text()
    for scope in SCOPES:
        topic = T.lab_images("client-labA", scope)
        assert f"a retained image on {topic}" in log and f"-t {topic} -r -n" in log
    assert len(results.messages) == len(SCOPES)  # no replay was answered

    # The operator's remedy (deploy/README.md): an empty retained message on each.
    operator = lab_broker.connect("operator")
    for scope in SCOPES:
        assert operator.publish_wait(T.lab_images("client-labA", scope), b"", retain=True)
    assert node.stop() == 0
    since = len(telemetry.messages)
    node.start()
    boots.wait_online(3)
    wait_for(lambda: reported(0), 60, "the node's telemetry without replays")
    wait_for(lambda: retained_metric(hub) == 0, 60, "the hub's metric back to 0")
    assert len(results.messages) == len(SCOPES)  # nor the clears
    for c in (boots, telemetry, results):
        c.close()
