"""cellwatch.client against a real broker and real (in-process) nodes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellwatch.client import (
    Answer,
    AsyncClient,
    BrokerUnavailable,
    Client,
    ClientSettings,
    InputError,
    NotAuthorized,
    PayloadTooLarge,
    ResultError,
    Timeout,
)
from cellwatch.shared.limits import BROKER_MAX_PACKET_BYTES
from cellwatch.shared.mqtt import PublishProps, packet_size
from cellwatch.shared.schemas import Result, utcnow
from tests import images
from tests.broker import Broker
from tests.client.conftest import ClientFactory
from tests.harness import T, wait_for
from tests.node.conftest import NodeFactory
from tests.responder import Responder, Seen


def test_classify_many_over_200_images_with_a_window(
    node_factory: NodeFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    node_factory("node-1")
    node_factory("node-2")
    client = client_factory()
    red, blue = images.jpeg(images.RED, 48, 64), images.jpeg(images.BLUE, 48, 64)
    inputs: list[bytes | Path] = []
    for i in range(200):
        if i % 4 == 0:  # a quarter of them as files
            path = tmp_path / f"smear-{i:03d}.jpg"
            path.write_bytes(blue)
            inputs.append(path)
        else:
            inputs.append(red)
    answers = list(client.classify_many(inputs, concurrency=8))
    assert Counter(a.input for a in answers) == Counter(
        str(x) if isinstance(x, Path) else f"bytes#{i}" for i, x in enumerate(inputs)
    )  # every input answered exactly once, tied to its input
    assert all(a.ok and a.attempts == 1 for a in answers)
    for a in answers:
        assert a.result is not None
        expected = "normal" if a.input.endswith(".jpg") else "ALL"
        assert a.result.label == expected, a
        if a.input.endswith(".jpg"):
            assert a.image_id == Path(a.input).stem == a.result.image_id
    assert {a.result.node_id for a in answers if a.result} == {"node-1", "node-2"}
    stats = client.stats()
    assert (stats.sent, stats.retries, stats.duplicates, stats.unknown) == (200, 0, 0, 0)


def test_error_results_are_answers_and_raise_for_status(
    node_factory: NodeFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    node_factory()
    client = client_factory()
    good = client.classify(images.png(images.RED), image_id="slide-1")
    assert good.raise_for_status().label == "ALL" and good.image_id == "slide-1"
    notes = tmp_path / "notes.txt"
    notes.write_bytes(images.TEXT)
    bad = client.classify(notes)  # returned, not raised
    assert bad.status == "unsupported_format" and not bad.ok
    with pytest.raises(ResultError, match="unsupported_format") as err:
        bad.raise_for_status()
    assert err.value.result is bad.result
    with pytest.raises(InputError, match="does not exist"):
        client.classify(tmp_path / "missing.tif")
    missing = list(client.classify_many([tmp_path / "missing.tif", images.jpeg()]))
    by_input = {a.input: a for a in missing}
    assert isinstance(by_input[str(tmp_path / "missing.tif")].error, InputError)
    assert by_input["bytes#1"].ok


def test_payload_too_large_is_refused_before_sending(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node = node_factory()
    client = client_factory()
    huge = b"\xff\xd8" + bytes(BROKER_MAX_PACKET_BYTES)
    with pytest.raises(PayloadTooLarge, match="maximum packet size"):
        client.classify(huge)
    answers = list(client.classify_many([huge, images.jpeg()]))
    assert sorted(a.status for a in answers) == ["ok", "payload_too_large"]
    # the big one never left, nor became a request (the client's own check, before
    # the MQTT layer would refuse the publish)
    assert (client.stats().requests, client.stats().sent) == (1, 1)
    assert client.classify(images.jpeg()).ok  # still connected
    wait_for(lambda: node.stats.processed >= 2, what="both small images acknowledged")
    assert node.stats.processed == 2


def test_an_image_that_fits_once_but_not_with_its_retries_is_refused(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    """The first publish would fit the broker's Maximum Packet Size exactly; a retry
    (user property attempt=12) would not: refused before sending, not answered
    payload_too_large by the node after one attempt."""
    node_factory()
    client = client_factory()
    topic = T.lab_images(client.settings.mqtt.username or "client", client.settings.source)
    first = PublishProps(
        response_topic=client.reply_topic, correlation_data=bytes(16), message_expiry_s=120
    )
    guess = BROKER_MAX_PACKET_BYTES - 1000
    n = guess + BROKER_MAX_PACKET_BYTES - packet_size(topic, bytes(guess), 1, first)
    assert packet_size(topic, bytes(n), 1, first) == BROKER_MAX_PACKET_BYTES
    with pytest.raises(PayloadTooLarge, match="maximum packet size"):
        client.classify(b"\xff\xd8" + bytes(n - 2))
    assert client.stats().requests == 0


def test_timeout_is_raised_close_to_timeout_s(
    broker: Broker, client_factory: ClientFactory
) -> None:
    client = client_factory(timeout_s=1.5, retry_after_s=0.5, max_attempts=3)  # no node runs
    start = time.monotonic()
    with pytest.raises(Timeout, match=r"no Result within 1\.\d s \(3 attempts\)") as err:
        client.classify(images.jpeg())
    elapsed = time.monotonic() - start
    assert err.value.attempts == 3
    assert 1.5 <= elapsed < 1.5 + 5.0  # the deadline, not a retry period later
    assert client.stats().timeouts == 1


def test_connection_errors_are_typed(broker: Broker) -> None:
    wrong = ClientSettings(mqtt=broker.settings("client", password="not-the-password"))
    with pytest.raises(NotAuthorized, match="refused the connection"):
        Client(wrong).connect()
    nowhere = ClientSettings(mqtt=broker.settings("client", port=1, connect_timeout_s=2.0))
    with pytest.raises(BrokerUnavailable):
        Client(nowhere).connect()


def test_a_refused_publish_is_not_authorized(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory()
    client = client_factory(user="hub")  # the hub may not publish images
    with pytest.raises(NotAuthorized, match="refused images on cellwatch/images/hub"):
        client.classify(images.jpeg())


def test_unknown_and_malformed_results_are_dropped_and_counted(
    broker: Broker, client_factory: ClientFactory
) -> None:
    fake = Result(
        status="ok",
        image_id="forged",
        source="lab",
        node_id="node-1",
        label="ALL",
        received_at=utcnow(),
        completed_at=utcnow(),
    )

    def node_that_misbehaves(seen: Seen, r: Responder) -> None:
        r.reply(seen, fake.to_json(), corr=b"not one of yours")
        r.reply(seen, b'{"schema": "cellwatch.result/1", "status": "maybe"}')
        r.reply(seen, fake.model_copy(update={"image_id": "real"}).to_json())

    responder = Responder(broker, node_that_misbehaves)
    client = client_factory()
    answer = client.classify(images.jpeg())
    assert answer.result is not None and answer.result.image_id == "real"
    stats = client.stats()
    assert (stats.unknown, stats.malformed, stats.answered) == (1, 1, 1)
    responder.close()


def test_async_client_from_asyncio(broker: Broker, node_factory: NodeFactory) -> None:
    node_factory()

    async def main() -> tuple[Answer, list[Answer]]:
        async with AsyncClient(ClientSettings(mqtt=broker.settings("client"))) as client:
            one = await client.classify(images.png(images.BLUE))
            many = [
                a
                async for a in client.classify_many(
                    [images.jpeg(images.RED, 48, 64)] * 40, concurrency=8
                )
            ]
            with pytest.raises(PayloadTooLarge):
                await client.classify(bytes(BROKER_MAX_PACKET_BYTES))
            return one, many

    one, many = asyncio.run(main())
    assert one.ok and one.result is not None and one.result.label == "normal"
    assert sorted(a.input for a in many) == sorted(f"bytes#{i}" for i in range(40))
    assert all(a.ok for a in many)


def test_async_classify_many_stopped_early_cancels_the_rest(
    broker: Broker, node_factory: NodeFactory
) -> None:
    node_factory()

    async def main() -> tuple[int, int]:
        async with AsyncClient(ClientSettings(mqtt=broker.settings("client"))) as client:
            taken = 0
            async for _ in client.classify_many([images.jpeg()] * 500, concurrency=4):
                taken += 1
                if taken == 3:
                    break
            return taken, client.stats().sent

    taken, sent = asyncio.run(main())
    assert taken == 3
    assert sent < 20  # the rest was never sent: the window closed with the iterator


def test_classify_many_keeps_exactly_its_window_in_flight(
    broker: Broker, client_factory: ClientFactory
) -> None:
    held: list[Seen] = []

    def answer_in_batches_of_5(seen: Seen, r: Responder) -> None:
        held.append(seen)  # answers once 5 wait: with fewer in flight this would hang
        if len(held) == 5:
            for s in held:
                result = Result(
                    status="ok",
                    image_id=f"{s.payload.decode()}",
                    source="lab",
                    node_id="node-1",
                    label="ALL",
                    received_at=utcnow(),
                    completed_at=utcnow(),
                )
                r.reply(s, result.to_json())
            held.clear()

    responder = Responder(broker, answer_in_batches_of_5)
    client = client_factory()
    inputs = [f"img-{i}".encode() for i in range(50)]
    answers = list(client.classify_many(inputs, concurrency=5))
    assert sorted(a.image_id for a in answers) == sorted(x.decode() for x in inputs)
    assert {a.input: a.image_id for a in answers} == {
        f"bytes#{i}": x.decode() for i, x in enumerate(inputs)
    }  # each Answer tied to its own input
    assert responder.max_unanswered == 5
    responder.close()


def test_node_sends_every_image_to_one_node(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory("node-1")
    node_factory("node-2")
    client = client_factory()
    answers = list(client.classify_many([images.jpeg()] * 12, node="node-2", concurrency=4))
    assert all(a.ok for a in answers) and len(answers) == 12
    assert {a.result.node_id for a in answers if a.result} == {"node-2"}
    one = client.classify(images.jpeg(), node="node-1", source="scope-2")
    assert one.result is not None and one.result.node_id == "node-1"
    # a direct image names its account too (nodes/N/images/{user}[/{source}])
    assert (one.result.source, one.result.scope) == ("client", "scope-2")


def test_classify_many_yields_each_answer_while_the_input_waits(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    """A stream (a generator that waits for its next image) gets each Answer as it
    comes: the next image is only produced once the previous one was answered, so a
    classify_many that held Answers back until its window filled would hang here."""
    node_factory("node-1")
    client = client_factory()
    answered: list[Answer] = []
    got_one = threading.Event()

    def stream() -> Iterator[bytes]:
        for i in range(5):
            got_one.clear()
            yield images.jpeg(images.RED if i % 2 else images.BLUE, 48, 64)
            assert got_one.wait(60), f"no Answer for image {i} while the stream waited"

    for answer in client.classify_many(stream(), concurrency=8):
        answered.append(answer)
        got_one.set()
    assert [a.input for a in answered] == [f"bytes#{i}" for i in range(5)]
    assert all(a.ok for a in answered)


def test_an_input_iterable_that_fails_raises_in_the_caller(
    node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory("node-1")
    client = client_factory()

    def broken() -> Iterator[bytes]:
        yield images.jpeg()
        raise OSError("the microscope share went away")

    with pytest.raises(OSError, match="share went away"):
        list(client.classify_many(broken(), concurrency=4))
    assert client.classify(images.jpeg()).ok  # the client is still usable
