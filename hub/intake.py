"""The hub's routes (shared/rpc/edge.py): what it accepts from the fleet and the
operator, on paho's network thread. Each is checked against its route's byte cap and
payload model there, then handed to the control thread (hub/control.py) or the fetch
workers (hub/fetch.py), never waiting.

- Caps: node status, telemetry, update and shadow reports MAX_NODE_MESSAGE_BYTES each
  (a real one is under 2 KB; a shadow window naming 16 disagreements, under 8 KB), API
  requests MAX_API_REQUEST_BYTES, bundle upload chunks MAX_UPLOAD_CHUNK_BYTES, fetch
  requests MAX_FETCH_REQUEST_BYTES. A node message over its cap, or one that does not
  validate, or one naming another node than its topic, is acknowledged, counted
  (`too_large`, `malformed`, `wrong_node`), logged and dropped; an API request over its
  cap or malformed is answered `too_large` / `bad_request` (without its payload being
  queued); a fetch request, `bad_request`. An empty status, telemetry or report clears
  a retained message: ignored. A shadow report the rollouts refuse is counted
  (`unknown_rollout`, `not_a_target`; a window after its phase, `phase_over`; a window
  stored before, `duplicate_window`).
- Telemetry (QoS 0): at most `telemetry_per_s` per node on average (bursts of
  `telemetry_burst`), and none while the control queue is deeper than
  `telemetry_high_water` (counted `rate_limited` / `backlog`).
- Status (QoS 1, retained): at most one status per node process (boot_id) waits for
  the control thread; a newer one of the same process replaces it in its place in
  the queue (the older is acknowledged and counted `superseded`): a node flooding
  its status costs one queue entry. Statuses of different processes (a restart, a
  late Will, two processes with one node id) are all queued, for the fleet's rules
  to see in order.
- QoS 1 messages are otherwise never dropped: the hub's Receive Maximum bounds how
  many the broker sends before the hub acknowledges them (after handling them).

Per-node state here (rate-limit buckets) is bounded by `max_nodes`, oldest evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cellwatch.hub.config import HubLimits
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.registry import MAX_UPLOAD_CHUNK_BYTES
from cellwatch.hub.rollout import Desired
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import TopicError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.hubapi import UPLOAD_VERB
from cellwatch.shared.limits import MAX_API_REQUEST_BYTES, MAX_NODE_MESSAGE_BYTES
from cellwatch.shared.rpc import Acks, Inbound, Problem, Rejected, Route, raw, response_topic
from cellwatch.shared.schemas import ApiRequest, NodeStatus, ShadowReport, Telemetry, UpdateReport
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

Handle = Callable[[Inbound[Any], str], bool]
"""A control-thread handler: (the message, its node id or ""); True when the rollout
engine should tick."""


@dataclass(eq=False)
class Incoming:
    """A message for the control thread: `handle` it there, then acknowledge it. A
    status may have its message replaced by a newer status of the same node process
    until the control thread takes it."""

    handle: Handle
    inbound: Inbound[Any]
    node_id: str = ""
    taken: bool = False


@dataclass(frozen=True)
class Confirmed:
    """The broker acknowledged the retained desired model written for a node."""

    desired: Desired


Task = Callable[[], None]
Item = Incoming | Confirmed | Task | None


class Handlers(Protocol):
    """What the control thread does with each kind of message (hub/control.py)."""

    def on_status(self, inbound: Inbound[NodeStatus], node_id: str) -> bool: ...
    def on_telemetry(self, inbound: Inbound[Telemetry], node_id: str) -> bool: ...
    def on_update(self, inbound: Inbound[UpdateReport], node_id: str) -> bool: ...
    def on_shadow(self, inbound: Inbound[ShadowReport], node_id: str) -> bool: ...
    def on_api(self, inbound: Inbound[ApiRequest], node_id: str) -> bool: ...
    def on_upload(self, inbound: Inbound[bytes], node_id: str) -> bool: ...
    def refuse_api(self, rejected: Rejected) -> None: ...


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
    """The hub's routes (see the module docstring)."""

    def __init__(
        self,
        topics: Topics,
        limits: HubLimits,
        counters: HubCounters,
        control: Handoff[Item],
        handlers: Handlers,
    ) -> None:
        self.topics = topics
        self.limits = limits
        self.counters = counters
        self.control = control
        self.handlers = handlers
        self._telemetry = RateLimiter(
            limits.telemetry_per_s, limits.telemetry_burst, limits.max_nodes
        )
        self._lock = threading.Lock()
        self._status: dict[str, Incoming] = {}
        """node_id -> its status waiting for the control thread (at most one)."""

    def routes(self) -> list[Route[Any]]:
        t, h = self.topics, self.handlers
        api_replies = response_topic(lambda message: t.hub_replies_filter())

        def node_route(
            leaf: str, model: Any, handler: Callable[[Any], None], qos: int = 1
        ) -> Route[Any]:
            return Route(
                t.node_filter(leaf),
                model.model_validate_json,
                handler,
                max_bytes=MAX_NODE_MESSAGE_BYTES,
                on_rejected=self._drop_node_message,
                acks=Acks.HANDLER,
                empty_clears=True,
                qos=qos,
                name=f"node {leaf}",
            )

        def operator_route(
            topic: str, body: Any, handle: Handle, cap: int, name: str
        ) -> Route[Any]:
            return Route(
                topic,
                body,
                lambda inbound: self.control.put(Incoming(handle, inbound)),
                max_bytes=cap,
                reply=api_replies,
                on_rejected=h.refuse_api,
                acks=Acks.HANDLER,
                name=name,
            )

        return [
            node_route("status", NodeStatus, self._on_status),
            node_route("telemetry", Telemetry, self._on_telemetry, qos=0),
            node_route("update", UpdateReport, self._on_update),
            node_route("shadow-report", ShadowReport, self._on_shadow),
            operator_route(
                t.hub_api_filter(),
                ApiRequest.model_validate_json,
                h.on_api,
                MAX_API_REQUEST_BYTES,
                "API request",
            ),
            operator_route(
                t.hub_api(UPLOAD_VERB), raw, h.on_upload, MAX_UPLOAD_CHUNK_BYTES, "upload chunk"
            ),
        ]

    # -- network thread ------------------------------------------------------------------
    def _node_of(self, inbound: Inbound[Any], named: str | None) -> str | None:
        """The node id of the message's topic, if the body (naming `named`) agrees;
        otherwise the message is counted and dropped (None)."""
        try:
            node_id = self.topics.node_id_of(inbound.topic)
        except TopicError:
            log.warning("hub: message on unexpected topic %s dropped", inbound.topic)
            inbound.ack()
            return None
        if named is not None and named != node_id:
            self.counters.dropped(DropReason.WRONG_NODE)
            log.warning("node %s: %s names node %s: ignored", node_id, inbound.topic, named)
            inbound.ack()
            return None
        return node_id

    def _drop_node_message(self, rejected: Rejected) -> None:
        too_large = rejected.problem is Problem.TOO_LARGE
        self.counters.dropped(DropReason.TOO_LARGE if too_large else DropReason.MALFORMED)
        log.warning("hub: %s ignored: %s", rejected.topic, rejected.reason)
        rejected.ack()

    def _on_update(self, inbound: Inbound[UpdateReport]) -> None:
        node_id = self._node_of(inbound, None)
        if node_id is not None:
            self.control.put(Incoming(self.handlers.on_update, inbound, node_id))

    def _on_shadow(self, inbound: Inbound[ShadowReport]) -> None:
        node_id = self._node_of(inbound, None)
        if node_id is not None:
            self.control.put(Incoming(self.handlers.on_shadow, inbound, node_id))

    def _on_telemetry(self, inbound: Inbound[Telemetry]) -> None:
        node_id = self._node_of(inbound, inbound.body.node_id)
        if node_id is None:
            return
        if not self._telemetry.allow(node_id, time.monotonic()):
            self.counters.dropped(DropReason.RATE_LIMITED)
            return
        item = Incoming(self.handlers.on_telemetry, inbound, node_id)
        if not self.control.offer(item, self.limits.telemetry_high_water):
            self.counters.dropped(DropReason.BACKLOG)

    def _on_status(self, inbound: Inbound[NodeStatus]) -> None:
        status = inbound.body
        node_id = self._node_of(inbound, status.node_id)
        if node_id is None:
            return
        with self._lock:
            waiting = self._status.get(node_id)
            same_process = (
                waiting is not None
                and not waiting.taken
                and waiting.inbound.body.boot_id == status.boot_id
            )
            if waiting is not None and same_process:
                older, waiting.inbound = waiting.inbound, inbound
            else:
                waiting = Incoming(self.handlers.on_status, inbound, node_id)
                self._status[node_id] = waiting
                older = None
        if older is None:
            self.control.put(waiting)
        else:
            self.counters.dropped(DropReason.SUPERSEDED)
            older.ack()

    # -- control thread ------------------------------------------------------------------
    def take(self, item: Incoming) -> Inbound[Any]:
        """The message the control thread handles now; from here on a newer status of
        the node waits in a new entry."""
        with self._lock:
            item.taken = True
            if item.node_id and self._status.get(item.node_id) is item:
                del self._status[item.node_id]
            return item.inbound


def api_error(rejected: Rejected) -> tuple[ApiErrorCode, str]:
    """The API's answer to a request its route refused."""
    if rejected.problem is Problem.TOO_LARGE:
        return ApiErrorCode.TOO_LARGE, f"request refused: {rejected.reason}"
    return ApiErrorCode.BAD_REQUEST, f"not an ApiRequest: {rejected.reason}"
