"""The chunk server: answers FetchRequests on `cellwatch/hub/fetch/{node_id}`
(node-driven, resumable: the node asks for any offset).

The node is the one named by the request's topic, which the broker's ACL lets only
that node write; the body does not name it. Reply (QoS 1, on the request's Response
Topic, which must be exactly that node's `cellwatch/nodes/{node_id}/fetch`): the raw
chunk, Correlation Data echoed, user properties `offset`, `total` (the file's size)
and `sha256` (of this chunk). Lengths are clamped to `max_chunk_bytes` (the node
learns the limit from the chunks it gets); offset == total gives an empty chunk.
Errors: an empty payload with user properties `error` (bad_request,
unknown_bundle, unknown_file, bad_offset) and `message`. A request on any other
topic, or whose Response Topic is not its node's, is logged and dropped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable

import paho.mqtt.client as paho
from pydantic import ValidationError

from cellwatch.hub.store import BundleStore
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import MqttError, TopicError
from cellwatch.shared.mqtt import PublishProps
from cellwatch.shared.schemas import FetchRequest
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

MAX_FETCH_REQUEST_BYTES = 4096
"""A FetchRequest is ~200 bytes of JSON; anything much larger is refused unread."""

Publish = Callable[[str, bytes, PublishProps], None]


def props_of(msg: paho.MQTTMessage) -> tuple[str | None, bytes | None]:
    """(Response Topic, Correlation Data) of a message."""
    p = msg.properties
    if p is None:
        return None, None
    rt = getattr(p, "ResponseTopic", None)
    corr = getattr(p, "CorrelationData", None)
    return (str(rt) if rt else None), (bytes(corr) if corr is not None else None)


Served = dict[str, dict[str, int]]
"""Bytes sent: node_id -> manifest sha256 -> bytes."""


def by_node(served: Served) -> dict[str, int]:
    return {node: sum(per.values()) for node, per in served.items()}


def by_bundle(served: Served) -> dict[str, int]:
    out: defaultdict[str, int] = defaultdict(int)
    for per in served.values():
        for sha, n in per.items():
            out[sha] += n
    return dict(out)


class FetchServer:
    def __init__(
        self, store: BundleStore, topics: Topics, publish: Publish, max_chunk_bytes: int
    ) -> None:
        self.store = store
        self.topics = topics
        self.publish = publish
        self.max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._served: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.requests = 0
        self.errors = 0

    # -- counters ----------------------------------------------------------------------
    def served(self) -> Served:
        """Bytes sent since start."""
        with self._lock:
            return {node: dict(per) for node, per in self._served.items()}

    # -- requests ------------------------------------------------------------------------
    def handle(self, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.requests += 1
        rt, corr = props_of(msg)
        try:
            node = self.topics.fetch_node_of(msg.topic)
        except TopicError:
            log.warning("fetch: dropping a request on %s: not a node's fetch topic", msg.topic)
            self._count_error()
            return
        if rt != self.topics.fetch_reply(node):
            log.warning(
                "fetch: node %s asked for replies on %r, not its own fetch topic: dropped",
                node,
                rt,
            )
            self._count_error()
            return
        if len(msg.payload) > MAX_FETCH_REQUEST_BYTES:
            self._error(
                rt, corr, ApiErrorCode.BAD_REQUEST, f"request over {MAX_FETCH_REQUEST_BYTES} bytes"
            )
            return
        try:
            req = FetchRequest.model_validate_json(msg.payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "request"
            self._error(
                rt, corr, ApiErrorCode.BAD_REQUEST, f"invalid FetchRequest: {where}: {err['msg']}"
            )
            return
        self._serve(node, req, rt, corr)

    def _serve(self, node: str, req: FetchRequest, rt: str, corr: bytes | None) -> None:
        sha = req.manifest_sha256
        if not self.store.has(sha):
            self._error(rt, corr, ApiErrorCode.UNKNOWN_BUNDLE, f"no bundle {sha[:12]} on this hub")
            return
        path = self.store.file(sha, req.file)
        if path is None:
            self._error(
                rt, corr, ApiErrorCode.UNKNOWN_FILE, f"bundle {sha[:12]} has no file {req.file!r}"
            )
            return
        length = min(req.length, self.max_chunk_bytes)
        try:
            with path.open("rb") as f:
                total = f.seek(0, 2)
                if req.offset > total:
                    self._error(
                        rt,
                        corr,
                        ApiErrorCode.BAD_OFFSET,
                        f"offset {req.offset} is past the end ({total})",
                    )
                    return
                f.seek(req.offset)
                data = f.read(length)
        except OSError as exc:
            log.error("fetch: cannot read %s of %s: %s", req.file, sha[:12], exc)
            self._error(rt, corr, ApiErrorCode.UNKNOWN_FILE, f"cannot read {req.file}")
            return
        props = PublishProps(
            correlation_data=corr,
            user=(
                ("offset", str(req.offset)),
                ("total", str(total)),
                ("sha256", hashlib.sha256(data).hexdigest()),
            ),
        )
        try:
            self.publish(rt, data, props)
        except MqttError as exc:
            log.error("fetch: node %s: cannot send chunk: %s", node, exc)
            return
        with self._lock:
            self._served[node][sha] += len(data)
        log.debug(
            "fetch: node %s: %s of %s at %d: %d bytes",
            node,
            req.file,
            sha[:12],
            req.offset,
            len(data),
        )

    def _count_error(self) -> None:
        with self._lock:
            self.errors += 1

    def _error(self, rt: str, corr: bytes | None, code: ApiErrorCode, message: str) -> None:
        self._count_error()
        log.warning("fetch: %s on %s: %s", code, rt, message)
        props = PublishProps(correlation_data=corr, user=(("error", code), ("message", message)))
        try:
            self.publish(rt, b"", props)
        except MqttError as exc:
            log.error("fetch: cannot send the error reply to %s: %s", rt, exc)
