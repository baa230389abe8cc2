"""The responder half of the request layer (cellwatch.shared.rpc.edge): routes driven
without a broker (caps, payload models, acknowledgements, reply policies), the one
check of a Response Topic, and an exact route winning over a wildcard on a real
broker."""

from __future__ import annotations

import threading

import pytest

from cellwatch.shared.rpc import (
    Acks,
    Edge,
    Inbound,
    Problem,
    Rejected,
    Route,
    deliver,
    raw,
    response_topic,
)
from cellwatch.shared.schemas import FetchRequest
from cellwatch.shared.topics import response_topic_allowed
from tests.broker import Broker, sync
from tests.edge import Acks as AckCount
from tests.edge import Recorder, message
from tests.harness import T, wait_for

SHA = "ab" * 32
REQUEST = FetchRequest(manifest_sha256=SHA, file="model.xml", offset=0, length=10).to_json()


@pytest.mark.parametrize(
    ("topic", "allowed", "ok"),
    [
        ("cellwatch/replies/client/abc", "cellwatch/replies/+/#", True),
        ("cellwatch/replies/client/a/b/c", "cellwatch/replies/+/#", True),
        ("cellwatch/replies/client", "cellwatch/replies/+/#", False),  # no level under it
        ("cellwatch/replies/client/", "cellwatch/replies/+/#", False),
        ("cellwatch/replies/bad.user/x", "cellwatch/replies/+/#", False),
        ("cellwatch/replies/client/+", "cellwatch/replies/+/#", False),
        ("cellwatch/replies/client/#", "cellwatch/replies/+/#", False),
        ("cellwatch/replies/client/x\x00", "cellwatch/replies/+/#", False),
        ("cellwatch/results/client", "cellwatch/replies/+/#", False),
        ("cellwatch/nodes/node-1/status", "cellwatch/replies/+/#", False),
        ("cellwatch/replies/labA/x", "cellwatch/replies/labA/#", True),  # one account
        ("cellwatch/replies/labB/x", "cellwatch/replies/labA/#", False),
        ("cellwatch/nodes/node-1/fetch", "cellwatch/nodes/node-1/fetch", True),  # exactly
        ("cellwatch/nodes/node-2/fetch", "cellwatch/nodes/node-1/fetch", False),
        ("cellwatch/nodes/node-1/fetch/x", "cellwatch/nodes/node-1/fetch", False),
        ("cellwatch/hub/replies/operator/cli-1", "cellwatch/hub/replies/+/#", True),
    ],
)
def test_one_check_of_a_response_topic(topic: str, allowed: str, ok: bool) -> None:
    assert response_topic_allowed(topic, allowed) is ok


def route(
    seen: list[Inbound[FetchRequest]],
    rejected: list[Rejected] | None = None,
    **kwargs: object,
) -> Route[FetchRequest]:
    values: dict[str, object] = {
        "filter": T.hub_fetch_filter(),
        "body": FetchRequest.model_validate_json,
        "handler": seen.append,
        "max_bytes": 4096,
        "reply": response_topic(lambda m: T.fetch_reply(T.fetch_node_of(m.topic))),
        "on_rejected": rejected.append if rejected is not None else None,
    }
    values.update(kwargs)
    return Route(**values)  # type: ignore[arg-type]


def test_a_valid_message_reaches_its_handler_typed_and_is_acknowledged_after_it() -> None:
    seen: list[Inbound[FetchRequest]] = []
    acks = AckCount()
    deliver(route(seen), message(T.hub_fetch("node-1"), REQUEST, ack=acks), Recorder())
    assert [i.body.file for i in seen] == ["model.xml"] and acks.count == 1


def test_over_the_cap_or_malformed_is_rejected_with_a_reason_and_acknowledged() -> None:
    seen: list[Inbound[FetchRequest]] = []
    rejected: list[Rejected] = []
    acks = AckCount()
    r = route(seen, rejected)
    deliver(r, message(T.hub_fetch("node-1"), b"x" * 4097, ack=acks), Recorder())
    deliver(r, message(T.hub_fetch("node-1"), b'{"offset": -1}', ack=acks), Recorder())
    assert seen == [] and acks.count == 2
    assert [x.problem for x in rejected] == [Problem.TOO_LARGE, Problem.MALFORMED]
    assert rejected[0].reason == "payload is 4097 bytes, over the 4096-byte limit"
    assert rejected[1].reason.startswith("manifest_sha256: Field required")  # field: reason
    # without on_rejected the edge logs and acknowledges it itself
    deliver(route(seen), message(T.hub_fetch("node-1"), b"{", ack=acks), Recorder())
    assert seen == [] and acks.count == 3


def test_empty_clears_and_acks_left_to_the_handler() -> None:
    seen: list[Inbound[FetchRequest]] = []
    acks = AckCount()
    deliver(route(seen, empty_clears=True), message("t", b"", ack=acks), Recorder())
    assert seen == [] and acks.count == 1  # a cleared retained message: ignored
    deliver(route(seen, acks=Acks.HANDLER), message("t", REQUEST, ack=acks), Recorder())
    assert len(seen) == 1 and acks.count == 1  # not yet: the handler's work is not done
    seen[0].ack()
    assert acks.count == 2


def test_replies_go_where_the_policy_says_with_the_correlation_data_echoed() -> None:
    seen: list[Inbound[FetchRequest]] = []
    out = Recorder()
    r = route(seen)
    deliver(
        r,
        message(
            T.hub_fetch("node-1"),
            REQUEST,
            correlation=b"c1",
            response_topic=T.fetch_reply("node-1"),
        ),
        out,
    )
    deliver(  # another node's reply topic: refused, and no fallback
        r,
        message(
            T.hub_fetch("node-1"),
            REQUEST,
            correlation=b"c2",
            response_topic=T.fetch_reply("node-2"),
        ),
        out,
    )
    assert seen[0].reply(b"chunk", user=(("offset", "0"),))
    assert not seen[1].reply(b"chunk")
    assert seen[1].reply_to.refused == T.fetch_reply("node-2")
    (sent,) = out.published
    assert (sent.topic, sent.payload, sent.correlation) == (
        T.fetch_reply("node-1"),
        b"chunk",
        b"c1",
    )
    assert sent.user == {"offset": "0"}


def test_a_refused_response_topic_falls_back_when_the_policy_has_one() -> None:
    policy = response_topic(lambda m: T.replies_filter("labA"), lambda m: T.results("labA"))
    seen: list[Inbound[bytes]] = []
    (images, _) = T.lab_images_filters()
    r: Route[bytes] = Route(images, raw, seen.append, max_bytes=None, reply=policy)
    out = Recorder()
    topic = T.lab_images("labA")
    deliver(r, message(topic, b"img", response_topic=T.status("node-1")), out)
    deliver(r, message(topic, b"img", response_topic=T.replies("labB", "x")), out)
    deliver(r, message(topic, b"img"), out)
    deliver(r, message(topic, b"img", response_topic=T.replies("labA", "x")), out)
    assert [i.reply_to.topic for i in seen] == [T.results("labA")] * 3 + [T.replies("labA", "x")]
    assert [i.reply_to.refused for i in seen] == [
        T.status("node-1"),
        T.replies("labB", "x"),
        None,
        None,
    ]


def test_an_exact_route_wins_over_a_wildcard_one(broker: Broker) -> None:
    """Through the real broker: `hub/api/upload` goes only to its own route, although
    `hub/api/+` matches it too."""
    got: dict[str, list[str]] = {"api": [], "upload": []}
    lock = threading.Lock()

    def keep(kind: str) -> Route[bytes]:
        def handle(inbound: Inbound[bytes]) -> None:
            with lock:
                got[kind].append(inbound.topic)

        topic = T.hub_api_filter() if kind == "api" else T.hub_api("upload")
        return Route(topic, raw, handle, max_bytes=None)

    hub = broker.connect("hub")
    edge = Edge(hub)
    edge.add(keep("api"))
    edge.add(keep("upload"))
    sync(hub)
    operator = broker.connect("operator")
    for verb in ("upload", "models", "upload"):
        assert operator.publish_wait(T.hub_api(verb), b"{}", qos=1)
    wait_for(lambda: len(got["api"]) + len(got["upload"]) >= 3, what="three messages")
    sync(hub)
    assert got == {"api": [T.hub_api("models")], "upload": [T.hub_api("upload")] * 2}
