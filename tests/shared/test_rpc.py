"""The shared request/response layer (cellwatch.shared.rpc) against a real broker and
a scripted answering peer."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from cellwatch.shared.limits import BROKER_MAX_PACKET_BYTES
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import (
    PacketTooLarge,
    PublishRefused,
    Reply,
    RequestPolicy,
    RequestTimeout,
    Rpc,
    RpcClosed,
)
from tests.broker import Broker
from tests.harness import T, wait_for
from tests.responder import Responder, Seen

TOPIC = T.lab_images("client", "scope-1")
QUICK = RequestPolicy(timeout_s=30.0)


def parse(msg: Message) -> Any:
    return json.loads(msg.payload)


@pytest.fixture
def rpc_factory(broker: Broker) -> Iterator[Callable[..., Rpc]]:
    made: list[Rpc] = []

    def make(window: int = 64) -> Rpc:
        topic = T.replies("client", f"rpc-{uuid.uuid4().hex[:8]}")
        mqtt = broker.connect("client", subscriptions=[(topic, 1)])
        rpc = Rpc(mqtt, topic, window=window, name="test").attach()
        made.append(rpc)
        return rpc

    yield make
    for rpc in made:
        rpc.close()


def body(i: int) -> bytes:
    return json.dumps({"n": i}).encode()


def test_a_window_bounds_what_is_in_flight(broker: Broker, rpc_factory: Callable[..., Rpc]) -> None:
    held: list[Seen] = []

    def in_batches_of_8(seen: Seen, r: Responder) -> None:
        held.append(seen)  # answers only once 8 wait: fewer in flight would hang here
        if len(held) == 8:
            for s in held:
                r.reply(s)
            held.clear()

    responder = Responder(broker, in_batches_of_8)
    rpc = rpc_factory(window=8)
    futures = [rpc.submit(TOPIC, body(i), parse, QUICK) for i in range(200)]
    assert [f.result(60).value for f in futures] == [{"n": i} for i in range(200)]
    assert responder.max_unanswered == 8  # reached, never passed
    stats = rpc.stats()
    assert (stats.requests, stats.sent, stats.answered, stats.in_flight) == (200, 200, 200, 0)
    assert (stats.retries, stats.duplicates, stats.unknown, stats.malformed) == (0, 0, 0, 0)
    responder.close()


def test_retry_sends_the_same_payload_with_attempt_and_shorter_expiry(
    broker: Broker, rpc_factory: Callable[..., Rpc]
) -> None:
    def second_only(seen: Seen, r: Responder) -> None:
        if seen.attempt >= 2:
            r.reply(seen)

    responder = Responder(broker, second_only)
    rpc = rpc_factory()
    reply = rpc.call(
        TOPIC, body(7), parse, RequestPolicy(timeout_s=20.0, retry_after_s=0.3, max_attempts=3)
    )
    assert reply.value == {"n": 7} and reply.attempt == 2 and reply.attempts == 2
    first, second = responder.seen
    assert "attempt" not in first.user and second.user["attempt"] == "2"
    assert first.payload == second.payload and first.corr != second.corr
    assert first.expiry is not None and second.expiry is not None
    assert first.expiry <= 20 and second.expiry <= first.expiry
    assert rpc.stats().retries == 1 and rpc.stats().sent == 2
    responder.close()


def test_a_late_answer_to_the_first_attempt_still_completes_the_request(
    broker: Broker, rpc_factory: Callable[..., Rpc]
) -> None:
    retried = threading.Event()
    first: list[Seen] = []

    def first_late(seen: Seen, r: Responder) -> None:
        if seen.attempt == 1:
            first.append(seen)  # held back ...
        else:
            retried.set()
            r.reply(first[0], body(1))  # ... and answered when attempt 2 comes; 2 never is

    responder = Responder(broker, first_late)
    rpc = rpc_factory()
    reply = rpc.call(
        TOPIC, body(1), parse, RequestPolicy(timeout_s=20.0, retry_after_s=0.2, max_attempts=5)
    )
    assert retried.is_set()
    assert reply.attempt == 1 and reply.attempts >= 2
    responder.close()


def test_the_first_answer_wins_duplicates_and_strangers_are_counted_and_dropped(
    broker: Broker, rpc_factory: Callable[..., Rpc]
) -> None:
    def noisy(seen: Seen, r: Responder) -> None:
        if json.loads(seen.payload)["n"] == 0:
            r.reply(seen, corr=b"someone else's")
            r.reply(seen, body=b"{not json")
            r.reply(seen, body=b'{"first": true}')
            r.reply(seen, body=b'{"second": true}')
            r.reply(seen, body=b'{"third": true}')
        else:
            r.reply(seen)

    responder = Responder(broker, noisy)
    rpc = rpc_factory()
    assert rpc.call(TOPIC, body(0), parse, QUICK).value == {"first": True}
    # The peer answers in order: once this answer is here, so are the ones before it.
    assert rpc.call(TOPIC, body(1), parse, QUICK).value == {"n": 1}
    stats = rpc.stats()
    assert (stats.unknown, stats.malformed, stats.duplicates) == (1, 1, 2)
    assert stats.answered == 2
    responder.close()


def test_no_answer_times_out_after_the_allowed_attempts(
    broker: Broker, rpc_factory: Callable[..., Rpc]
) -> None:
    responder = Responder(broker, lambda seen, r: None)
    rpc = rpc_factory()
    policy = RequestPolicy(timeout_s=2.0, retry_after_s=0.2, max_attempts=2)
    future = rpc.submit(TOPIC, body(0), parse, policy)
    with pytest.raises(RequestTimeout) as err:
        future.result(30)
    assert err.value.attempts == 2 and err.value.connected
    assert err.value.waited_s >= 2.0
    assert [s.attempt for s in responder.seen] == [1, 2]
    stats = rpc.stats()
    assert (stats.timeouts, stats.in_flight, stats.sent) == (1, 0, 2)
    responder.close()


def test_a_refused_publish_fails_the_request(rpc_factory: Callable[..., Rpc]) -> None:
    rpc = rpc_factory()
    with pytest.raises(PublishRefused, match="user 'client'"):
        rpc.call(T.hub_api("models"), b"{}", parse, QUICK)  # only the operator may
    assert rpc.stats().refused == 1 and rpc.stats().in_flight == 0


def test_a_request_over_the_broker_packet_size_is_not_sent(
    broker: Broker, rpc_factory: Callable[..., Rpc]
) -> None:
    responder = Responder(broker, lambda seen, r: r.reply(seen, b"{}"))
    rpc = rpc_factory()
    with pytest.raises(PacketTooLarge, match="maximum packet size"):
        rpc.call(TOPIC, b"x" * BROKER_MAX_PACKET_BYTES, parse, QUICK)
    assert rpc.stats().sent == 0
    assert rpc.call(TOPIC, b"{}", parse, QUICK).value == {}  # still connected
    assert len(responder.seen) == 1
    responder.close()


def test_cancelling_frees_the_slot_and_a_late_answer_is_counted(
    broker: Broker, rpc_factory: Callable[..., Rpc]
) -> None:
    held: list[Seen] = []

    def hold_first(seen: Seen, r: Responder) -> None:
        if json.loads(seen.payload)["n"] == 0:
            held.append(seen)
        else:
            r.reply(seen)

    responder = Responder(broker, hold_first)
    rpc = rpc_factory(window=1)
    first = rpc.submit(TOPIC, body(0), parse, QUICK)
    wait_for(lambda: bool(held), what="first request at the peer")
    assert first.cancel()
    assert rpc.call(TOPIC, body(1), parse, QUICK).value == {"n": 1}  # the one slot is free
    responder.reply(held[0])
    assert rpc.call(TOPIC, body(2), parse, QUICK).value == {"n": 2}
    assert rpc.stats().late == 1 and rpc.stats().answered == 2
    responder.close()


def test_futures_complete_off_the_network_thread_and_close_fails_the_rest(
    broker: Broker, rpc_factory: Callable[..., Rpc]
) -> None:
    responder = Responder(
        broker, lambda seen, r: r.reply(seen) if json.loads(seen.payload)["n"] else None
    )
    rpc = rpc_factory()
    threads: list[str] = []

    def note(f: Future[Reply[Any]]) -> None:
        threads.append(threading.current_thread().name)

    answered = rpc.submit(TOPIC, body(1), parse, QUICK)
    answered.add_done_callback(note)
    answered.result(30)
    wait_for(lambda: bool(threads), what="done-callback")
    assert threads == ["test-rpc"]  # the dispatcher, not paho's network thread
    never = rpc.submit(TOPIC, body(0), parse, QUICK)
    wait_for(lambda: len(responder.seen) == 2, what="second request at the peer")
    rpc.close()
    with pytest.raises(RpcClosed):
        never.result(10)
    with pytest.raises(RpcClosed):
        rpc.submit(TOPIC, body(3), parse, QUICK)
    responder.close()


def test_the_quick_size_bound_is_an_upper_bound() -> None:
    from cellwatch.shared.mqtt import PublishProps, publish_packet_size

    for props in (
        PublishProps(),
        PublishProps(response_topic="cellwatch/replies/client/é-x", correlation_data=bytes(16)),
        PublishProps(
            response_topic="r",
            correlation_data=b"c",
            message_expiry_s=2**32 - 1,
            content_type="image/tiff",
            user=(("image_id", "ü" * 128), ("attempt", "12")),
        ),
    ):
        for topic in ("cellwatch/images/a", "cellwatch/images/" + "x" * 64):
            exact = publish_packet_size(topic, b"p" * 300, 1, props.to_paho())
            assert exact <= 300 + len(topic.encode()) + 9 + props.size_bound()
