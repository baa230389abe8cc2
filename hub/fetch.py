"""The chunk server: answers FetchRequests on `cellwatch/hub/fetch/{node_id}`
(node-driven, resumable: the node asks for any offset), through the edge's fetch
route (`route()`: a FetchRequest of at most MAX_FETCH_REQUEST_BYTES).

The node is the one named by the request's topic, which the broker's ACL lets only
that node write; the body does not name it. The route's reply policy allows only
that node's `cellwatch/nodes/{node_id}/fetch` as the Response Topic; a request with
any other is logged and dropped. Reply (QoS 1): a chunk in the one chunk format
(shared/rpc/transfer.py: the raw bytes, user properties `offset`, `total` (the
file's size) and `sha256`), Correlation Data echoed. Lengths are clamped to
`max_chunk_bytes` (the node learns the limit from the chunks it gets); offset ==
total gives an empty chunk. Errors: an empty payload with user properties `error`
(bad_request, revoked: none of a revoked bundle's files is handed out, unknown_bundle,
unknown_file, bad_offset) and `message`. The network
thread only checks and queues (`take`, at most FETCH_QUEUE waiting; beyond that a
request is dropped and counted: the node asks again); `fetch-N` workers `serve`.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.store import BundleStore
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import MqttError, TopicError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import Acks, Delivery, Inbound, Problem, Rejected, ReplyPolicy, Route
from cellwatch.shared.rpc import response_topic as reply_on_response_topic
from cellwatch.shared.rpc.transfer import chunk_properties, error_properties
from cellwatch.shared.schemas import FetchRequest
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

MAX_FETCH_REQUEST_BYTES = 4096
"""A FetchRequest is ~200 bytes of JSON; anything much larger is refused unread."""
FETCH_QUEUE = 256


def fetch_replies(topics: Topics) -> ReplyPolicy:
    """Replies go only to the asking node's own fetch topic."""

    def scope(message: Message) -> str | None:
        try:
            return topics.fetch_reply(topics.fetch_node_of(message.topic))
        except TopicError:
            return None

    return reply_on_response_topic(scope)


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
        self, store: BundleStore, topics: Topics, max_chunk_bytes: int, counters: HubCounters
    ) -> None:
        self.store = store
        self.topics = topics
        self.max_chunk_bytes = max_chunk_bytes
        self.counters = counters
        self.queue: Handoff[Inbound[FetchRequest]] = Handoff(FETCH_QUEUE, name="hub: fetch")
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

    def _count(self, error: bool) -> None:
        with self._lock:
            self.requests += 1
            self.errors += error

    # -- network thread ----------------------------------------------------------------
    def route(self) -> Route[FetchRequest]:
        return Route(
            self.topics.hub_fetch_filter(),
            FetchRequest.model_validate_json,
            self.take,
            max_bytes=MAX_FETCH_REQUEST_BYTES,
            reply=fetch_replies(self.topics),
            on_rejected=self.refuse,
            acks=Acks.HANDLER,
            name="fetch request",
        )

    def take(self, inbound: Inbound[FetchRequest]) -> None:
        """Queue a request for the fetch workers (never waits)."""
        if not self.queue.offer(inbound):
            log.warning("fetch: queue full, dropping a request (the node asks again)")
            self.counters.dropped(DropReason.FETCH_QUEUE_FULL)
            inbound.ack()

    def refuse(self, rejected: Rejected) -> None:
        """A request over the cap or not a FetchRequest: a bad_request answer."""
        if rejected.problem is Problem.MALFORMED:
            message = f"invalid FetchRequest: {rejected.reason}"
        else:
            message = f"request {rejected.reason}"
        self._count(error=True)
        if self._deliverable(rejected):
            self._error(rejected, ApiErrorCode.BAD_REQUEST, message)
        rejected.ack()

    # -- fetch workers -----------------------------------------------------------------
    def serve(self, inbound: Inbound[FetchRequest]) -> None:
        """Answer one request, then acknowledge it."""
        try:
            self._serve(inbound)
        finally:
            inbound.ack()

    def _deliverable(self, delivery: Delivery) -> bool:
        if delivery.reply_to.topic is not None:
            return True
        log.warning(
            "fetch: a request on %s asked for replies on %r, not its node's own fetch "
            "topic: dropped",
            delivery.topic,
            delivery.reply_to.refused,
        )
        return False

    def _serve(self, inbound: Inbound[FetchRequest]) -> None:
        if not self._deliverable(inbound):
            self._count(error=True)
            return
        node = self.topics.fetch_node_of(inbound.topic)  # valid: the policy checked it
        req = inbound.body
        sha = req.manifest_sha256
        if self.store.refused(sha):
            self._error(inbound, ApiErrorCode.REVOKED, f"bundle {sha[:12]} was revoked")
            return
        if not self.store.has(sha):
            self._error(inbound, ApiErrorCode.UNKNOWN_BUNDLE, f"no bundle {sha[:12]} on this hub")
            return
        path = self.store.file(sha, req.file)
        if path is None:
            self._error(
                inbound,
                ApiErrorCode.UNKNOWN_FILE,
                f"bundle {sha[:12]} has no file {req.file!r}",
            )
            return
        length = min(req.length, self.max_chunk_bytes)
        try:
            with path.open("rb") as f:
                total = f.seek(0, 2)
                if req.offset > total:
                    self._error(
                        inbound,
                        ApiErrorCode.BAD_OFFSET,
                        f"offset {req.offset} is past the end ({total})",
                    )
                    return
                f.seek(req.offset)
                data = f.read(length)
        except OSError as exc:
            log.error("fetch: cannot read %s of %s: %s", req.file, sha[:12], exc)
            self._error(inbound, ApiErrorCode.UNKNOWN_FILE, f"cannot read {req.file}")
            return
        self._count(error=False)
        try:
            inbound.reply(data, user=chunk_properties(req.offset, data, total))
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

    def _error(self, delivery: Delivery, code: ApiErrorCode, message: str) -> None:
        if not isinstance(delivery, Rejected):
            self._count(error=True)
        log.warning("fetch: %s on %s: %s", code, delivery.reply_to.topic, message)
        try:
            delivery.reply(b"", user=error_properties(code, message))
        except MqttError as exc:
            log.error("fetch: cannot send the error reply to %s: %s", delivery.reply_to.topic, exc)
