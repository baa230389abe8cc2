"""The hub's routes without a broker: a bundle pushed through the API and upload
routes, then served by the fetch server, all driven by hand-made messages
(tests/edge.py) into the hub's real parts (database, store, registry, control
thread's handlers); the replies recorded instead of published. test_push.py,
test_fetch.py and test_api.py show the same through the real broker."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cellwatch.hub.api import Api
from cellwatch.hub.config import HubLimits
from cellwatch.hub.control import Control
from cellwatch.hub.counters import HubCounters
from cellwatch.hub.db import Database
from cellwatch.hub.fetch import FetchServer
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.intake import Intake, Item
from cellwatch.hub.orchestrator import Orchestrator
from cellwatch.hub.registry import Registry
from cellwatch.hub.served import ServedTotals
from cellwatch.hub.store import BundleStore
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.hubapi import (
    PushBeginArgs,
    PushBeginReply,
    PushCommitArgs,
    RolloutPolicy,
    UploadAck,
)
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import Route, deliver
from cellwatch.shared.rpc.transfer import chunk_properties, read_sized_chunk
from cellwatch.shared.schemas import ApiReply, ApiRequest, FetchRequest
from cellwatch.shared.signing import TrustedKeys
from tests.edge import Acks, Recorder, message
from tests.harness import T
from tests.hub.conftest import Bundles

REPLIES = T.hub_replies("operator", "test")


@dataclass
class Hub:
    routes: dict[str, Route[Any]]
    control: Control
    queue: Handoff[Item]
    fetch: FetchServer
    counters: HubCounters
    out: Recorder

    def send(self, route: str, msg: Message) -> None:
        deliver(self.routes[route], msg, self.out)
        while len(self.queue):  # the control thread's work, here
            self.control.handle(self.queue.get(0))

    def call(self, verb: str, args: Any = None, *, payload: bytes | None = None) -> ApiReply:
        """An API request through its route; the ApiReply it got."""
        body = ApiRequest(
            request_id=f"id-{len(self.out.published)}",
            args=args.model_dump(mode="json") if args is not None else {},
        ).to_json()
        corr = f"c{len(self.out.published)}".encode()
        self.send(
            "api",
            message(T.hub_api(verb), payload or body, response_topic=REPLIES, correlation=corr),
        )
        (reply,) = [p for p in self.out.on(REPLIES) if p.correlation == corr]
        return ApiReply.model_validate_json(reply.payload)

    def upload(self, upload_id: str, name: str, offset: int, data: bytes, total: int) -> ApiReply:
        corr = f"u{len(self.out.published)}".encode()
        user = (("upload_id", upload_id), ("file", name), *chunk_properties(offset, data, total))
        self.send(
            "upload",
            message(T.hub_api("upload"), data, response_topic=REPLIES, correlation=corr, user=user),
        )
        (reply,) = [p for p in self.out.on(REPLIES) if p.correlation == corr]
        return ApiReply.model_validate_json(reply.payload)


@pytest.fixture
def hub(bundles: Bundles, tmp_path: Path) -> Iterator[Hub]:
    db = Database(tmp_path / "hub.db")
    store = BundleStore(tmp_path / "store")
    registry = Registry(db, store, TrustedKeys.load(bundles.keys), allow_unsigned=False)
    fleet = Fleet(db)
    orchestrator = Orchestrator(db, fleet, registry, RolloutPolicy(), lambda desired: None)
    counters = HubCounters()
    fetch = FetchServer(store, T, 4096, counters)
    served = ServedTotals(fetch, db)
    queue: Handoff[Item] = Handoff()
    control = Control(
        topics=T,
        db=db,
        fleet=fleet,
        registry=registry,
        orchestrator=orchestrator,
        api=Api(db, registry, fleet, orchestrator, served),
        served=served,
        counters=counters,
        queue=queue,
        tick_s=1.0,
        stop=threading.Event(),
    )
    intake = Intake(T, HubLimits(), counters, queue, control)
    control.intake = intake
    routes = {r.name: r for r in (*intake.routes(), fetch.route())}
    named = {"api": routes["API request"], "upload": routes["upload chunk"]}
    yield Hub(
        {**named, "fetch": routes["fetch request"]}, control, queue, fetch, counters, Recorder()
    )
    db.close()


def push(hub: Hub, bundle: Path) -> str:
    sig = bundle / SIGNATURE_FILE
    begin = hub.call(
        "push.begin",
        PushBeginArgs(
            manifest=base64.b64encode((bundle / MANIFEST_FILE).read_bytes()).decode(),
            signature=base64.b64encode(sig.read_bytes()).decode(),
        ),
    )
    assert begin.ok, begin.error
    info = PushBeginReply.model_validate(begin.data)
    assert info.upload_id is not None
    for name, f in info.files.items():
        data = (bundle / name).read_bytes()
        for offset in range(0, len(data), 50_000):
            reply = hub.upload(info.upload_id, name, offset, data[offset : offset + 50_000], f.size)
            assert reply.ok, reply.error
        assert UploadAck.model_validate(reply.data).complete
    commit = hub.call("push.commit", PushCommitArgs(upload_id=info.upload_id))
    assert commit.ok, commit.error
    return info.upload_id


def test_a_bundle_pushed_through_the_routes_is_served_in_the_one_chunk_format(
    hub: Hub, bundles: Bundles
) -> None:
    sha = push(hub, bundles.v1)
    xml = (bundles.v1 / "model.xml").read_bytes()
    acks = Acks()
    request = FetchRequest(manifest_sha256=sha, file="model.xml", offset=100, length=10_000)
    hub.send(
        "fetch",
        message(
            T.hub_fetch("node-1"),
            request.to_json(),
            response_topic=T.fetch_reply("node-1"),
            correlation=b"f1",
            ack=acks,
        ),
    )
    assert acks.count == 0  # queued for a fetch worker
    inbound = hub.fetch.queue.get(0)
    assert inbound is not None
    hub.fetch.serve(inbound)
    assert acks.count == 1
    (sent,) = hub.out.on(T.fetch_reply("node-1"))
    assert sent.correlation == b"f1"
    chunk = read_sized_chunk(Message(sent.topic, sent.payload, user=sent.user))
    assert (chunk.offset, chunk.total, chunk.data) == (100, len(xml), xml[100:4196])  # clamped
    assert hub.fetch.served() == {"node-1": {sha: 4096}}


def test_bad_requests_get_error_replies_or_none(hub: Hub, bundles: Bundles) -> None:
    sha = push(hub, bundles.v1)
    ok = FetchRequest(manifest_sha256=sha, file="model.xml", offset=0, length=10).to_json()
    for payload in (b"{not json", b"x" * 5000):
        hub.send(
            "fetch",
            message(T.hub_fetch("node-1"), payload, response_topic=T.fetch_reply("node-1")),
        )
    # another node's reply topic: no reply at all
    hub.send("fetch", message(T.hub_fetch("node-1"), ok, response_topic=T.fetch_reply("node-2")))
    hub.fetch.serve(hub.fetch.queue.get(0))  # type: ignore[arg-type]
    errors = [p.user["error"] for p in hub.out.on(T.fetch_reply("node-1"))]
    assert errors == ["bad_request", "bad_request"] and hub.out.on(T.fetch_reply("node-2")) == []
    assert hub.fetch.errors == 3
    # the API: over its cap, not an ApiRequest, an unknown verb, a chunk of nothing
    too_large = hub.call("models", payload=b"{" + b" " * 70_000 + b"}")
    malformed = hub.call("models", payload=b"[]")
    unknown = hub.call("nope")
    no_upload = hub.upload("0" * 64, "model.xml", 0, b"x", 1)
    codes = [r.error.code if r.error else None for r in (too_large, malformed, unknown, no_upload)]
    assert codes == ["too_large", "bad_request", "unknown_verb", "not_found"]
    assert hub.counters.dropped_by_reason()["too_large"] == 1
