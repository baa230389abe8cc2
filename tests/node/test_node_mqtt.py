"""The node over a real Mosquitto (started from the project's mosquitto.conf)."""

from __future__ import annotations

import threading

import pytest

from cellwatch.node.errors import DeviceError
from cellwatch.shared.schemas import NodeStatus, Result, Telemetry
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, Sent, T, wait_for
from tests.node.conftest import NodeFactory


def test_classifies_and_echoes_binary_correlation_data(
    node_factory: NodeFactory, requester: Requester
) -> None:
    node = node_factory()
    assert node.model is not None
    corr = b"\xff\xfe\x00not-utf8\x80"
    red = requester.result(requester.send(images.jpeg(images.RED), correlation=corr))
    assert red.status == "ok" and red.label == "ALL" and red.node_id == "node-1"
    assert (
        red.model == node.model.bundle.ref and red.source == "client"
    )  # the account: the ACL vouches for it
    assert red.probabilities is not None and abs(sum(red.probabilities.values()) - 1) < 1e-4
    assert red.timings_ms.total >= red.timings_ms.infer > 0
    blue = requester.request(images.png(images.BLUE), image_id="slide-7")
    assert blue.label == "normal" and blue.image_id == "slide-7"


def test_results_topic_for_a_v311_publisher(broker: Broker, node_factory: NodeFactory) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    node_factory()
    results = Collector(broker.settings("client"), T.results("client"))
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="old-scope", protocol=paho.MQTTv311)
    c.username_pw_set("client", broker.password("client"))
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        payload = images.jpeg(images.BLUE)
        c.publish(T.lab_images("client", "scope-9"), payload, qos=1).wait_for_publish(10)
        wait_for(lambda: bool(results.on(T.results("client"))), what="result on results/client")
        r = Result.model_validate_json(results.on(T.results("client"))[0].payload)
        assert r.status == "ok" and r.label == "normal" and r.source == "client"
        assert len(r.image_id) == 16  # derived from the payload's SHA-256
    finally:
        c.loop_stop()
        c.disconnect()
        results.close()


BAD_INPUTS: list[tuple[str, bytes, str | None]] = [
    ("zero-byte", b"", "undecodable_image"),
    ("random", images.random_bytes(), "unsupported_format"),
    ("truncated-jpeg", images.truncated_jpeg(), "undecodable_image"),
    ("text", images.TEXT, "unsupported_format"),
    ("huge-header-png", images.huge_header_png(), "image_too_large"),
    ("one-pixel", images.one_pixel_png(images.RED), None),
    ("tiff16", images.tiff16(images.RED), None),
    ("rgba-png", images.rgba_png(images.RED), None),
    ("gray-jpeg", images.gray_jpeg(), None),
]


def test_bad_inputs_get_error_results_and_nothing_is_lost(
    node_factory: NodeFactory, requester: Requester
) -> None:
    node_factory(limits={"max_image_bytes": 300_000})
    sent: dict[Sent, tuple[str, str | None]] = {}
    for name, payload, code in BAD_INPUTS:
        sent[requester.send(payload)] = (name, code)
        sent[requester.send(images.jpeg(images.RED))] = ("good-after-" + name, None)
    big = images.png(images.RED, h=1200, w=1600)  # > 300 kB
    assert len(big) > 300_000
    sent[requester.send(big)] = ("over-size-limit", "payload_too_large")
    sent[requester.send(images.bmp(images.RED))] = ("bmp", None)
    for corr, (name, code) in sent.items():
        r = requester.result(corr)
        if code is None:
            assert r.status == "ok", name
            if name != "gray-jpeg":
                assert r.label == "ALL", name
        else:
            assert r.status == "error" and r.error is not None, name
            assert r.error.code == code, name
    assert requester.count() == len(sent)
    assert requester.stats().duplicates == 0  # one answer each


def test_invalid_source_and_image_id(node_factory: NodeFactory, requester: Requester) -> None:
    node = node_factory()
    bad_topic = T.lab_images("client") + "/not.valid"
    r = requester.request(images.jpeg(), topic=bad_topic)
    assert r.status == "error" and r.error is not None and r.error.code == "invalid_request"
    r = requester.request(images.jpeg(), image_id="no spaces allowed")
    assert r.error is not None and r.error.code == "invalid_request"
    # without a Response Topic there is nowhere valid to answer: logged, acked, not retried
    requester.client.publish_wait(bad_topic, images.jpeg(), qos=1)
    assert requester.request(images.jpeg()).status == "ok"
    wait_for(lambda: node.stats.inflight == 0, what="all images acknowledged")


def test_refused_response_topic_is_still_acked(
    node_factory: NodeFactory, requester: Requester
) -> None:
    node = node_factory()
    # node-1 may not write another node's status: the broker refuses the Result
    requester.send(images.jpeg(), response_topic=T.status("node-2"))
    assert requester.request(images.jpeg()).status == "ok"
    wait_for(
        lambda: node.stats.inflight == 0 and node.stats.processed == 2,
        what="refused result acknowledged",
    )


def test_message_expiry_passes_while_queued(
    node_factory: NodeFactory, requester: Requester
) -> None:
    # one decode worker and slow (large, well-compressed) images ahead of the one that
    # expires: it waits in the node's queue far longer than its 1 s expiry.
    node_factory(limits={"decode_workers": 1, "receive_maximum": 64})
    slow = images.flat_png(images.RED)
    slow_ids = [requester.send(slow) for _ in range(8)]
    expiring = requester.send(images.jpeg(), expiry_s=1)
    after = requester.send(images.jpeg())
    r = requester.result(expiring, timeout=120)
    assert r.status == "error" and r.error is not None and r.error.code == "expired"
    assert all(requester.result(c, timeout=120).status == "ok" for c in slow_ids)
    assert requester.result(after).status == "ok"


def test_no_model_answers_no_model(node_factory: NodeFactory, requester: Requester) -> None:
    node_factory(model={"bundle": None})
    r = requester.request(images.jpeg())
    assert r.status == "error" and r.error is not None and r.error.code == "no_model"
    assert r.model is None


def test_status_online_then_offline_by_will_and_by_stop(
    broker: Broker, node_factory: NodeFactory
) -> None:
    watch = Collector(broker.settings("hub"), T.node_filter("status"))
    try:
        node = node_factory()
        wait_for(lambda: bool(watch.on(T.status("node-1"))), what="online status")
        online = NodeStatus.model_validate_json(watch.on(T.status("node-1"))[-1].payload)
        assert online.state == "online" and online.boot_id == node.boot_id
        assert online.model is not None and online.devices_available
        node.mqtt.drop()  # no DISCONNECT: the broker publishes the Will
        wait_for(lambda: len(watch.on(T.status("node-1"))) >= 2, what="Will")
        will = NodeStatus.model_validate_json(watch.on(T.status("node-1"))[-1].payload)
        assert will.state == "offline" and will.boot_id == node.boot_id
        second = node_factory()
        assert second.boot_id != node.boot_id
        wait_for(lambda: len(watch.on(T.status("node-1"))) >= 3, what="second online")
        second.join()
        wait_for(lambda: len(watch.on(T.status("node-1"))) >= 4, what="offline on stop")
        last = NodeStatus.model_validate_json(watch.on(T.status("node-1"))[-1].payload)
        assert last.state == "offline" and last.boot_id == second.boot_id
        assert watch.on(T.status("node-1"))[-1].retained is False  # live delivery
    finally:
        watch.close()
    retained = Collector(broker.settings("hub"), T.status("node-1"))
    try:
        wait_for(lambda: bool(retained.on(T.status("node-1"))), what="retained status")
        msg = retained.on(T.status("node-1"))[0]
        assert msg.retained and NodeStatus.model_validate_json(msg.payload).state == "offline"
    finally:
        retained.close()


def test_telemetry(broker: Broker, node_factory: NodeFactory, requester: Requester) -> None:
    watch = Collector(broker.settings("hub"), T.telemetry("node-1"))
    try:
        node_factory()
        for _ in range(5):
            requester.request(images.jpeg())
        requester.request(b"")

        def latest() -> Telemetry | None:
            msgs = watch.on(T.telemetry("node-1"))
            return Telemetry.model_validate_json(msgs[-1].payload) if msgs else None

        wait_for(lambda: (t := latest()) is not None and t.processed == 6, what="telemetry")
        t = latest()
        assert t is not None
        assert t.errors == 1 and t.model_version == "1.0.0" and t.rss_mb > 10
        assert t.latency_ms.p99 >= t.latency_ms.p50 > 0
    finally:
        watch.close()


def test_direct_images_queued_while_node_is_down_are_delivered(
    node_factory: NodeFactory, requester: Requester
) -> None:
    first = node_factory()
    assert requester.request(images.jpeg()).status == "ok"
    first.join()  # graceful: the persistent session (with the direct topic) stays
    direct = T.node_lab_images("node-1", "client")
    queued = [requester.send(images.jpeg(images.BLUE), topic=direct) for _ in range(10)]
    node_factory()
    for corr in queued:
        assert requester.result(corr).label == "normal"


def test_a_stopped_node_strands_nothing(node_factory: NodeFactory, requester: Requester) -> None:
    """A graceful stop leaves the shared subscription first: images sent afterwards all
    go to the node still running, none wait in the stopped node's session."""
    node_factory("node-1")
    leaving = node_factory("node-2")
    assert {requester.request(images.jpeg()).node_id for _ in range(6)} == {"node-1", "node-2"}
    leaving.join()
    after = [requester.send(images.jpeg()) for _ in range(20)]
    assert {requester.result(c).node_id for c in after} == {"node-1"}


def test_a_flood_is_bounded_and_loses_nothing(
    node_factory: NodeFactory, requester: Requester
) -> None:
    limits = {"receive_maximum": 2, "max_inflight": 3, "decode_workers": 1}
    node = node_factory(limits=limits, inference={"infer_requests": 1})
    slow = images.flat_png(images.RED, h=2000, w=2000)
    corrs = [requester.send(slow) for _ in range(30)]
    for c in corrs:
        assert requester.result(c).status == "ok"
    # Mosquitto sends far more than the Receive Maximum once acknowledgements flow; at
    # max_inflight waiting the node stops reading (shared/mqttloop.py), so at most:
    # the queue + decoding + inferring + the rest of one read pass (paho reads every
    # complete packet it has, up to one per own publish awaiting its PUBACK: a Result
    # or two). Without the hold, 15 waited here.
    assert 3 <= node.stats.peak_unanswered <= 3 + 1 + 1 + 3


def test_shared_subscription_spreads_work(node_factory: NodeFactory, requester: Requester) -> None:
    node_factory("node-1")
    node_factory("node-2")
    corrs = [requester.send(images.jpeg()) for _ in range(30)]
    nodes = {requester.result(c).node_id for c in corrs}
    assert nodes == {"node-1", "node-2"}
    assert requester.count() == 30 and requester.stats().duplicates == 0  # each image once


def test_direct_topic(node_factory: NodeFactory, requester: Requester) -> None:
    node_factory("node-1")
    node_factory("node-2")
    for _ in range(5):
        r = requester.request(images.jpeg(), topic=T.node_lab_images("node-2", "client", "s"))
        assert (r.node_id, r.source, r.scope) == ("node-2", "client", "s")


def test_unavailable_device_is_a_startup_error(node_factory: NodeFactory) -> None:
    with pytest.raises(DeviceError, match=r"'NPU' is not available; devices present: .*CPU"):
        node_factory(inference={"device": "NPU"}, start=False)
    with pytest.raises(DeviceError, match=r"MYRIAD needs OpenVINO 2022\.3"):
        node_factory(inference={"device": "MYRIAD"}, start=False)


def test_many_concurrent_requesters(node_factory: NodeFactory, broker: Broker) -> None:
    node_factory()
    clients = [Requester(broker.settings("client")) for _ in range(3)]
    try:

        def flood(r: Requester) -> None:
            for c in [r.send(images.jpeg()) for _ in range(15)]:
                r.result(c)

        threads = [threading.Thread(target=flood, args=(r,)) for r in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r.count() == 15 for r in clients)
    finally:
        for r in clients:
            r.close()
