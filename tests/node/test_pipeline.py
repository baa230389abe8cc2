"""The node's image path without a broker: the image route driven by hand-made
messages (tests/edge.py), a real toy model on OpenVINO, real decode workers, the
Results recorded instead of published. The MQTT tests (test_node_mqtt.py,
test_faults.py) show the same through the real broker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openvino as ov
import pytest

from cellwatch.node.classifier import Classifier
from cellwatch.node.decode import ImageLimits
from cellwatch.node.engine import EngineConfig, ServingModel, load_serving_model
from cellwatch.node.faults import NO_FAULTS
from cellwatch.node.journal import Journal
from cellwatch.node.pipeline import ImagePipeline
from cellwatch.node.stats import Stats
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.mqtt import Message, topic_matches
from cellwatch.shared.rpc import Route, deliver
from cellwatch.shared.schemas import Result
from cellwatch.shared.signing import TrustedKeys
from tests import images
from tests.edge import Acks, Recorder, message
from tests.harness import T, wait_for

NODE = "node-1"
LAB = "client"
IMAGES = T.lab_images(LAB, "scope-1")
RESULTS = T.results(LAB)


def routes_of(pipeline: ImagePipeline, topic: str) -> list[Route[bytes]]:
    return [r for r in pipeline.routes() if topic_matches(r.filter, topic)]


@dataclass
class Rig:
    pipeline: ImagePipeline
    out: Recorder
    stats: Stats
    holds: list[str]

    def send(self, msg: Message) -> None:
        """Through the route the topic belongs to, as the edge would."""
        (route,) = routes_of(self.pipeline, msg.topic)
        deliver(route, msg, self.out)

    def results(self, topic: str) -> list[Result]:
        return [Result.model_validate_json(p.payload) for p in self.out.on(topic)]


@pytest.fixture(scope="module")
def toy_model(toy_bundle: tuple[Path, Path]) -> ServingModel:
    bundle, keys = toy_bundle
    verified = load_bundle(bundle, TrustedKeys.load(keys))
    return load_serving_model(ov.Core(), verified, EngineConfig(infer_requests=2))


@pytest.fixture
def rig(toy_model: ServingModel, tmp_path: Path) -> Iterator[Rig]:
    stats = Stats(window_s=10.0)
    holds: list[str] = []
    pipeline = ImagePipeline(
        node_id=NODE,
        topics=T,
        classifier=Classifier(NODE, ImageLimits(max_bytes=1_000_000)),
        stats=stats,
        journal=Journal(tmp_path / "state"),
        faults=NO_FAULTS,
        model=lambda: toy_model,
        capacity=4,
        start_wait_s=10.0,
        on_device_error=lambda consecutive: None,
        on_full=lambda: holds.append("hold"),
        on_room=lambda: holds.append("release"),
    )
    toy_model.set_callback(pipeline.on_inferred)
    pipeline.accept(True)
    out = Recorder()
    workers = [threading.Thread(target=pipeline.worker_loop, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    yield Rig(pipeline, out, stats, holds)
    pipeline.close()
    for w in workers:
        w.join(10)
    pipeline.journal.close()


def test_an_image_gets_one_result_where_it_asked_then_its_ack(rig: Rig) -> None:
    acks = Acks()
    replies = T.replies(LAB, "me")
    rig.send(
        message(
            IMAGES,
            images.jpeg(images.RED),
            correlation=b"corr-1",
            response_topic=replies,
            user=(("image_id", "slide-1"),),
            ack=acks,
        )
    )
    wait_for(lambda: acks.count == 1, what="the ack after the Result")
    (sent,) = rig.out.published
    assert (sent.topic, sent.correlation, sent.qos) == (replies, b"corr-1", 1)
    (result,) = rig.results(replies)
    assert (result.status, result.label, result.image_id) == ("ok", "ALL", "slide-1")
    assert (result.source, result.scope) == (LAB, "scope-1")  # the account its topic names
    assert rig.stats.processed == 1 and rig.stats.inflight == 0


def test_bad_requests_are_answered_with_errors_where_they_may_go(rig: Rig) -> None:
    acks = Acks()
    cases = [
        # a Response Topic outside replies/, and one under another account's replies:
        # the error goes to results/{the account that sent the image}
        message(IMAGES, images.jpeg(), response_topic=T.status(NODE), ack=acks),
        message(IMAGES, images.jpeg(), response_topic=T.replies("client-labB", "x"), ack=acks),
        # a bad image_id, and a payload over the route's byte cap
        message(IMAGES, images.jpeg(), user=(("image_id", "a b"),), ack=acks),
        message(IMAGES, b"\xff" * 1_000_001, ack=acks),
        # the direct topic answers the account it names too, on its results
        message(T.node_lab_images(NODE, LAB), b"not an image", ack=acks),
    ]
    for m in cases:
        rig.send(m)
    wait_for(lambda: acks.count == 5, what="five acks")
    results = rig.results(RESULTS)
    codes = sorted(str(r.error.code) for r in results if r.error)
    assert codes == [
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "payload_too_large",
        "unsupported_format",
    ]
    assert {r.source for r in results} == {LAB}
    refused = [r.error.message for r in results if r.error and "Response Topic" in r.error.message]
    assert len(refused) == 2 and all("cellwatch/replies/client/" in m for m in refused)
    assert [p.topic for p in rig.out.published] == [RESULTS] * 5  # nowhere else


def test_the_old_direct_topic_naming_no_account_reaches_no_route(rig: Rig) -> None:
    assert routes_of(rig.pipeline, T.node_images(NODE)) == []
    assert routes_of(rig.pipeline, T.lab_images(LAB, "a") + "/b") == []
    assert len(routes_of(rig.pipeline, T.node_lab_images(NODE, LAB, "a"))) == 1
    assert routes_of(rig.pipeline, T.node_lab_images("node-2", LAB)) == []


def test_a_retained_replay_and_a_cleared_image_are_acknowledged_unanswered(rig: Rig) -> None:
    acks = Acks()
    rig.send(message(IMAGES, images.jpeg(), retained=True, ack=acks))
    assert acks.count == 1 and rig.out.published == [] and rig.stats.retained_images == 1
    rig.send(message(IMAGES, b"", retained=True, ack=acks))  # the operator's clear
    rig.send(message(IMAGES, b"", ack=acks))  # its live delivery
    assert acks.count == 3 and rig.out.published == [] and rig.stats.retained_images == 1
    # an empty image a client asks about is answered, as any image that is none
    rig.send(message(IMAGES, b"", response_topic=T.replies(LAB, "me"), ack=acks))
    wait_for(lambda: acks.count == 4, what="the empty image answered")
    (r,) = rig.results(T.replies(LAB, "me"))
    assert r.error is not None and r.error.code == "undecodable_image"


def test_a_full_backlog_holds_the_reading_and_releases_it(rig: Rig) -> None:
    acks = Acks()
    rig.pipeline.accept(False)  # nothing taken: shows the route leaves it unacked
    rig.send(message(IMAGES, images.jpeg(), ack=acks))
    assert acks.count == 0 and rig.pipeline.backlog.peak == 0
    rig.pipeline.accept(True)
    big = images.jpeg(images.BLUE, h=1200, w=1600)
    for _ in range(12):  # far faster than two workers decode them
        rig.send(message(IMAGES, big, ack=acks))
    wait_for(lambda: acks.count == 12, what="twelve answered")
    assert rig.holds[:2] == ["hold", "release"]
    assert rig.holds.count("hold") == rig.holds.count("release")
    assert {r.label for r in rig.results(RESULTS)} == {"normal"}
