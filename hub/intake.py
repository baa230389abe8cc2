"""What the hub does with each incoming message on paho's network thread: check it
against its topic's size cap, rate-limit telemetry, coalesce statuses, and hand it to
the control thread (hub/handover.py) or the fetch workers. Nothing here waits.

- Size caps, before anything is queued: node status, telemetry and update reports
  NODE_MESSAGE_MAX_BYTES each (a real one is under 2 KB), API requests
  MAX_API_REQUEST_BYTES, bundle upload chunks MAX_UPLOAD_CHUNK_BYTES, fetch requests
  MAX_FETCH_REQUEST_BYTES. A node message over its cap is acknowledged, counted
  `too_large` and dropped unread; an API request over it is answered `too_large`
  (without its payload); a fetch request over it is queued cut to one byte over the
  cap, which the fetch server answers `bad_request`.
- Telemetry (QoS 0): at most `telemetry_per_s` per node on average (bursts of
  `telemetry_burst`), and none while the control queue is deeper than
  `telemetry_high_water` (counted `rate_limited` / `backlog`).
- Status (QoS 1, retained): at most one valid status per node process (boot_id)
  waits for the control thread; a newer one of the same process replaces it in its
  place in the queue (the older is acknowledged and counted `superseded`): a node
  flooding its status costs one queue entry. Statuses of different processes (a
  restart, a late Will, two processes with one node id) are all queued, for the
  fleet's rules to see in order; a status that does not validate (or names another
  node) never replaces one: it is queued on its own, and the control thread counts
  and logs it.
- QoS 1 messages are otherwise never dropped: the hub's Receive Maximum bounds how
  many the broker sends before the hub acknowledges them (after handling them).

Per-node state here (rate-limit buckets) is bounded by `max_nodes`, oldest evicted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import paho.mqtt.client as paho
from pydantic import ValidationError

from cellwatch.hub.config import HubLimits
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.fetch import MAX_FETCH_REQUEST_BYTES, props_of
from cellwatch.hub.handover import Handover
from cellwatch.hub.registry import MAX_UPLOAD_CHUNK_BYTES
from cellwatch.hub.rollout import Desired
from cellwatch.shared.errors import TopicError
from cellwatch.shared.hubapi import UPLOAD_VERB
from cellwatch.shared.limits import MAX_API_REQUEST_BYTES
from cellwatch.shared.schemas import NodeStatus
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

NODE_MESSAGE_MAX_BYTES = 16 * 1024
"""Largest status, telemetry or update report the hub reads (a real one is < 2 KB)."""


class Kind(StrEnum):
    STATUS = "status"
    TELEMETRY = "telemetry"
    UPDATE = "update"
    API = "api"


@dataclass(eq=False)
class Incoming:
    """A message for the control thread. A status one may have its message replaced
    by a newer status of the same node until the control thread takes it."""

    kind: Kind
    msg: paho.MQTTMessage
    generation: int
    node_id: str | None = None
    taken: bool = False
    status: NodeStatus | None = None
    """A status already validated on the way in (it goes with msg)."""


@dataclass(frozen=True)
class Oversized:
    """An API request over its size cap: answered `too_large` without its payload."""

    topic: str
    response_topic: str | None
    correlation: bytes | None
    size: int
    limit: int


@dataclass(frozen=True)
class Confirmed:
    """The broker acknowledged the retained desired model written for a node."""

    desired: Desired


Task = Callable[[], None]
Item = Incoming | Oversized | Confirmed | Task | None
Ack = Callable[[paho.MQTTMessage, int], None]


class RateLimiter:
    """Token buckets per key (rate per second, burst), the `max_keys` most recent."""

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


class Intake:
    """Routes messages from the network thread (see the module docstring)."""

    def __init__(
        self,
        topics: Topics,
        limits: HubLimits,
        counters: HubCounters,
        control: Handover[Item],
        fetch: queue.Queue[tuple[paho.MQTTMessage, int] | None],
        *,
        ack: Ack,
        generation: Callable[[], int],
    ) -> None:
        self.topics = topics
        self.limits = limits
        self.counters = counters
        self.control = control
        self.fetch = fetch
        self._ack = ack
        self._generation = generation
        self._api_prefix = topics.hub_api(UPLOAD_VERB)[: -len(UPLOAD_VERB)]
        self._fetch_prefix = topics.hub_fetch_filter()[:-1]
        self._telemetry = RateLimiter(
            limits.telemetry_per_s, limits.telemetry_burst, limits.max_nodes
        )
        self._lock = threading.Lock()
        self._status: dict[str, Incoming] = {}
        """node_id -> its status waiting for the control thread (at most one)."""

    # -- network thread ------------------------------------------------------------------
    def on_message(self, msg: paho.MQTTMessage) -> None:
        topic, size, generation = msg.topic, len(msg.payload), self._generation()
        if topic.startswith(self._fetch_prefix):
            self._on_fetch(msg, size, generation)
        elif topic.startswith(self._api_prefix):
            self._on_api(msg, size, generation)
        else:
            self._on_node(msg, size, generation)

    def _drop(self, msg: paho.MQTTMessage, generation: int, reason: DropReason) -> None:
        self.counters.dropped(reason)
        self._ack(msg, generation)

    def _on_fetch(self, msg: paho.MQTTMessage, size: int, generation: int) -> None:
        if size > MAX_FETCH_REQUEST_BYTES:
            # Keep the queue small; the fetch server still sees it is too large.
            msg.payload = bytes(msg.payload[: MAX_FETCH_REQUEST_BYTES + 1])
        try:
            self.fetch.put_nowait((msg, generation))
        except queue.Full:
            log.warning("fetch: queue full, dropping a request (the node asks again)")
            self._drop(msg, generation, DropReason.FETCH_QUEUE_FULL)

    def _on_api(self, msg: paho.MQTTMessage, size: int, generation: int) -> None:
        upload = msg.topic == self._api_prefix + UPLOAD_VERB
        limit = MAX_UPLOAD_CHUNK_BYTES if upload else MAX_API_REQUEST_BYTES
        if size > limit:
            rt, corr = props_of(msg)
            log.warning("api: a %d-byte request on %s refused unread", size, msg.topic)
            self._drop(msg, generation, DropReason.TOO_LARGE)
            self.control.put(Oversized(msg.topic, rt, corr, size, limit))
            return
        self.control.put(Incoming(Kind.API, msg, generation))

    def _on_node(self, msg: paho.MQTTMessage, size: int, generation: int) -> None:
        try:
            node_id = self.topics.node_id_of(msg.topic)
            kind = Kind(msg.topic.rsplit("/", 1)[-1])
        except (TopicError, ValueError):
            log.warning("hub: message on unexpected topic %s dropped", msg.topic)
            self._ack(msg, generation)
            return
        if size > NODE_MESSAGE_MAX_BYTES:
            log.warning(
                "node %s: a %d-byte %s dropped unread (over %d bytes)",
                node_id,
                size,
                kind,
                NODE_MESSAGE_MAX_BYTES,
            )
            self._drop(msg, generation, DropReason.TOO_LARGE)
            return
        if kind is Kind.TELEMETRY:
            self._on_telemetry(msg, node_id, generation)
        elif kind is Kind.STATUS:
            self._on_status(msg, node_id, generation)
        else:
            self.control.put(Incoming(kind, msg, generation, node_id))

    def _on_telemetry(self, msg: paho.MQTTMessage, node_id: str, generation: int) -> None:
        if not self._telemetry.allow(node_id, time.monotonic()):
            self.counters.dropped(DropReason.RATE_LIMITED)
            return
        item = Incoming(Kind.TELEMETRY, msg, generation, node_id)
        if not self.control.offer(item, self.limits.telemetry_high_water):
            self.counters.dropped(DropReason.BACKLOG)

    def _on_status(self, msg: paho.MQTTMessage, node_id: str, generation: int) -> None:
        try:
            status = NodeStatus.model_validate_json(msg.payload) if msg.payload else None
        except ValidationError:
            status = None
        if status is None or status.node_id != node_id:  # the control thread says why
            self.control.put(Incoming(Kind.STATUS, msg, generation, node_id))
            return
        with self._lock:
            waiting = self._status.get(node_id)
            same_process = (
                waiting is not None
                and not waiting.taken
                and waiting.status is not None
                and waiting.status.boot_id == status.boot_id
            )
            if waiting is not None and same_process:
                older, older_generation = waiting.msg, waiting.generation
                waiting.msg, waiting.generation, waiting.status = msg, generation, status
            else:
                waiting = Incoming(Kind.STATUS, msg, generation, node_id, status=status)
                self._status[node_id] = waiting
                older = None
        if older is None:
            self.control.put(waiting)
        else:
            self._drop(older, older_generation, DropReason.SUPERSEDED)

    # -- control thread ------------------------------------------------------------------
    def take(self, item: Incoming) -> tuple[paho.MQTTMessage, int, NodeStatus | None]:
        """The message, its connection generation and its validated status (if it is
        one) the control thread handles now; from here on a newer status of the node
        waits in a new entry."""
        with self._lock:
            item.taken = True
            if item.node_id is not None and self._status.get(item.node_id) is item:
                del self._status[item.node_id]
            return item.msg, item.generation, item.status
