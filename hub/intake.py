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
- Statuses (QoS 1, retained) are coalesced per node, whatever their boot_id: a node
  has at most one entry in the control queue (`StatusSlot`), holding the newest
  status of each of its last MAX_PROCESSES_WAITING processes in the order the hub
  heard of them (so the fleet's rules still see a restart, a late Will or two
  processes with one node id in order). A status that replaces one is acknowledged
  and counted `superseded`. A node's slot enters the queue at most `status_per_s`
  times a second on average (bursts of `status_burst`); beyond that it is held
  back, counted `rate_limited`, and queued by the control thread once the node's
  rate allows (`release`): the latest status is always applied.
- Telemetry (QoS 0) is coalesced per node too (a newer one replaces the one waiting:
  `superseded`), at most `telemetry_per_s` per node on average (bursts of
  `telemetry_burst`; beyond: dropped, `rate_limited`), and none while the control
  queue is deeper than `telemetry_high_water` (`backlog`).
- A node over its rate is one warning per minute (hub/ratelimit.py), not a line per
  message.
- The revocation list (`hub/revoked`, retained; only the hub may write it, so it is
  an earlier hub's list, or this one's): handed to the control thread, which learns
  each signed revocation it does not know (`Handlers.on_revocations`). At start it
  arrives before the hub publishes its own list, so a hub restored from an older
  backup re-learns what was revoked since, instead of publishing a list without it.
- A site's bridge link (`sites/{site}/bridge`, retained `1` / its Will's `0`; only
  that site's bridge account may write it): handed to the control thread
  (`Handlers.on_site_link`, hub/sites.py).
- QoS 1 messages are otherwise never dropped: the hub's Receive Maximum bounds how
  many the broker sends before the hub acknowledges them (after handling them).
- `Outage` says what the control thread does with each kind of message while the
  database is not writable (hub/control.py).

Per-node state here (rate-limit buckets, flood counts) is bounded by `max_nodes`,
oldest evicted; a node's slot and waiting telemetry leave when the control thread
takes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from cellwatch.hub.config import HubLimits
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.push import MAX_UPLOAD_CHUNK_BYTES
from cellwatch.hub.ratelimit import FloodLog, RateLimiter
from cellwatch.hub.targets import Desired
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import TopicError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.hubapi import UPLOAD_VERB
from cellwatch.shared.limits import (
    MAX_API_REQUEST_BYTES,
    MAX_NODE_MESSAGE_BYTES,
    MAX_REVOCATION_BYTES,
)
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import Acks, Inbound, Problem, Rejected, Route, raw, response_topic
from cellwatch.shared.sampletransfer import MAX_OFFER_BYTES
from cellwatch.shared.schemas import (
    ApiRequest,
    NodeStatus,
    RevocationList,
    ShadowReport,
    Telemetry,
    UpdateReport,
)
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

MAX_SITE_LINK_BYTES = 16
"""A bridge notification is `0` or `1`."""

Handle = Callable[[Inbound[Any], str], bool]
"""A control-thread handler: (the message, its node id or ""); True when the rollout
engine should tick."""


MAX_PROCESSES_WAITING = 3
"""A node's statuses waiting for the control thread: the newest of each of at most this
many of its processes (boot_id); a status of another evicts the oldest's."""


class Outage(Enum):
    """What the control thread does with a message while the database is not writable
    (hub/control.py)."""

    WAIT = "wait"
    """Kept, not acknowledged, and handled in order once it is (update and shadow
    reports, the revocation list; a node's statuses wait in its slot)."""
    DROP = "drop"
    """Acknowledged and counted `database` (telemetry: the next one comes)."""
    TRY = "try"
    """Handled anyway (API calls: a read works, a write is answered with an error)."""


@dataclass(eq=False)
class Incoming:
    """A message for the control thread: `handle` it there, then acknowledge it. A
    node's telemetry may have its message replaced by a newer one until the control
    thread takes it."""

    handle: Handle
    inbound: Inbound[Any]
    node_id: str = ""
    outage: Outage = Outage.TRY
    taken: bool = False


@dataclass(eq=False)
class StatusSlot:
    """A node's statuses waiting for the control thread: one entry in its queue per
    node (see the module docstring). Changed under the intake's lock only."""

    node_id: str
    statuses: OrderedDict[str, Inbound[NodeStatus]] = field(default_factory=OrderedDict)
    """boot_id -> its newest status, in the order the hub first heard of each."""
    queued: bool = False
    taken: bool = False

    def add(self, inbound: Inbound[NodeStatus], first: bool = False) -> list[Inbound[Any]]:
        """Keep inbound (at the front: first); the statuses it replaces or evicts."""
        boot = inbound.body.boot_id
        older = self.statuses.pop(boot, None)
        if older is not None and first:  # given back: the one waiting here is newer
            self.statuses[boot] = older
            self.statuses.move_to_end(boot, last=False)
            return [inbound]
        self.statuses[boot] = inbound
        if first:
            self.statuses.move_to_end(boot, last=False)
        out: list[Inbound[Any]] = [older] if older is not None else []
        while len(self.statuses) > MAX_PROCESSES_WAITING:
            _, evicted = self.statuses.popitem(last=False)
            out.append(evicted)
        return out


@dataclass(frozen=True)
class Confirmed:
    """The broker acknowledged the retained desired model written for a node."""

    desired: Desired


Task = Callable[[], None]
Item = Incoming | StatusSlot | Confirmed | Task | None


class Handlers(Protocol):
    """What the control thread does with each kind of message (hub/control.py)."""

    def on_status(self, inbound: Inbound[NodeStatus], node_id: str) -> bool: ...
    def on_telemetry(self, inbound: Inbound[Telemetry], node_id: str) -> bool: ...
    def on_update(self, inbound: Inbound[UpdateReport], node_id: str) -> bool: ...
    def on_shadow(self, inbound: Inbound[ShadowReport], node_id: str) -> bool: ...
    def on_api(self, inbound: Inbound[ApiRequest], node_id: str) -> bool: ...
    def on_upload(self, inbound: Inbound[bytes], node_id: str) -> bool: ...
    def on_revocations(self, inbound: Inbound[RevocationList], node_id: str) -> bool: ...
    def on_site_link(self, inbound: Inbound[bytes], node_id: str) -> bool: ...
    def on_sample_offer(self, inbound: Inbound[bytes], node_id: str) -> bool: ...
    def on_sample_chunk(self, inbound: Inbound[bytes], node_id: str) -> bool: ...
    def refuse_api(self, rejected: Rejected) -> None: ...


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
        self._telemetry_rate = RateLimiter(
            limits.telemetry_per_s, limits.telemetry_burst, limits.max_nodes
        )
        self._status_rate = RateLimiter(limits.status_per_s, limits.status_burst, limits.max_nodes)
        self.flood = FloodLog(limits.max_nodes)
        self._lock = threading.Lock()
        self._slots: dict[str, StatusSlot] = {}
        """node_id -> its slot until the control thread takes it (queued or held)."""
        self._held: dict[str, StatusSlot] = {}
        """The slots not in the queue: held back by their node's rate, or given back by
        the control thread while the database is not writable."""
        self._telemetry: dict[str, Incoming] = {}
        """node_id -> its telemetry waiting for the control thread."""

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
            *self._sample_routes(),
            Route(
                t.hub_revoked(),
                RevocationList.model_validate_json,
                lambda inbound: self.control.put(
                    Incoming(h.on_revocations, inbound, outage=Outage.WAIT)
                ),
                max_bytes=MAX_REVOCATION_BYTES,
                acks=Acks.HANDLER,
                empty_clears=True,
                name="revocation list",
            ),
            Route(
                t.site_link_filter(),
                raw,
                lambda inbound: self.control.put(Incoming(h.on_site_link, inbound)),
                max_bytes=MAX_SITE_LINK_BYTES,
                acks=Acks.HANDLER,
                empty_clears=True,
                name="site link",
            ),
        ]

    def _sample_routes(self) -> list[Route[Any]]:
        """A node's field-sample offers and chunks (shared/sampletransfer.py), answered
        on that node's `nodes/{node_id}/samples` only."""
        t, h = self.topics, self.handlers

        def scope(message: Message) -> str | None:
            try:
                return t.samples_reply(t.samples_node_of(message.topic))
            except TopicError:
                return None

        def to_control(handle: Handle) -> Callable[[Inbound[bytes]], None]:
            def put(inbound: Inbound[bytes]) -> None:
                self.control.put(Incoming(handle, inbound, t.samples_node_of(inbound.topic)))

            return put

        offers, chunks = t.hub_samples_filters()
        return [
            Route(
                topic,
                raw,
                to_control(handle),
                max_bytes=cap,
                reply=response_topic(scope),
                on_rejected=h.refuse_api,
                acks=Acks.HANDLER,
                name=name,
            )
            for topic, handle, cap, name in (
                (offers, h.on_sample_offer, MAX_OFFER_BYTES, "sample offer"),
                (chunks, h.on_sample_chunk, MAX_UPLOAD_CHUNK_BYTES, "sample chunk"),
            )
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
            handle = self.handlers.on_update
            self.control.put(Incoming(handle, inbound, node_id, outage=Outage.WAIT))

    def _on_shadow(self, inbound: Inbound[ShadowReport]) -> None:
        node_id = self._node_of(inbound, None)
        if node_id is not None:
            handle = self.handlers.on_shadow
            self.control.put(Incoming(handle, inbound, node_id, outage=Outage.WAIT))

    def _on_telemetry(self, inbound: Inbound[Telemetry]) -> None:
        node_id = self._node_of(inbound, inbound.body.node_id)
        if node_id is None:
            return
        now = time.monotonic()
        if not self._telemetry_rate.allow(node_id, now):
            self.counters.dropped(DropReason.RATE_LIMITED)
            self.flood.note(node_id, "telemetry dropped", now)
            return
        fresh = False
        with self._lock:
            waiting = self._telemetry.get(node_id)
            if waiting is not None:
                waiting.inbound = inbound  # the newer replaces it (QoS 0: nothing to ack)
            else:
                waiting = Incoming(self.handlers.on_telemetry, inbound, node_id, Outage.DROP)
                self._telemetry[node_id] = waiting
                fresh = True
        if not fresh:
            self.counters.dropped(DropReason.SUPERSEDED)
        elif not self.control.offer(waiting, self.limits.telemetry_high_water):
            with self._lock:
                if self._telemetry.get(node_id) is waiting:
                    del self._telemetry[node_id]
            self.counters.dropped(DropReason.BACKLOG)

    def _on_status(self, inbound: Inbound[NodeStatus]) -> None:
        status = inbound.body
        node_id = self._node_of(inbound, status.node_id)
        if node_id is None:
            return
        now = time.monotonic()
        with self._lock:
            slot = self._slots.get(node_id)
            if slot is None:
                slot = self._slots[node_id] = StatusSlot(node_id)
            replaced = slot.add(inbound)
            queue = not slot.queued and self._status_rate.allow(node_id, now)
            if queue:
                slot.queued = True
                self._held.pop(node_id, None)
            elif not slot.queued:
                self._held[node_id] = slot
        for older in replaced:
            self.counters.dropped(DropReason.SUPERSEDED)
            older.ack()
        if queue:
            self.control.put(slot)
        elif not slot.queued:
            self.counters.dropped(DropReason.RATE_LIMITED)
            self.flood.note(node_id, "statuses held back", now)

    # -- control thread ------------------------------------------------------------------
    def take(self, item: Incoming) -> Inbound[Any]:
        """The message the control thread handles now; from here on a newer telemetry of
        the node waits in a new entry."""
        with self._lock:
            item.taken = True
            if item.node_id and self._telemetry.get(item.node_id) is item:
                del self._telemetry[item.node_id]
            return item.inbound

    def take_statuses(self, slot: StatusSlot) -> list[Inbound[NodeStatus]]:
        """The statuses the control thread handles now, in order; from here on newer
        ones of the node wait in a new slot."""
        with self._lock:
            slot.taken = True
            if self._slots.get(slot.node_id) is slot:
                del self._slots[slot.node_id]
            return list(slot.statuses.values())

    def give_back(self, node_id: str, statuses: list[Inbound[NodeStatus]]) -> None:
        """Statuses the control thread could not apply (the database is not writable):
        they wait, held, in the node's slot (before any that came since, which replace
        theirs of the same process), until `release` queues it."""
        with self._lock:
            slot = self._slots.get(node_id)
            if slot is None:
                slot = self._slots[node_id] = StatusSlot(node_id)
            replaced = [old for s in reversed(statuses) for old in slot.add(s, first=True)]
            if not slot.queued:
                self._held[node_id] = slot
        for older in replaced:
            self.counters.dropped(DropReason.SUPERSEDED)
            older.ack()

    def release(self, now: float) -> int:
        """Queue the held slots whose node's rate allows it now; how many."""
        queued = []
        with self._lock:
            for node_id, slot in list(self._held.items()):
                if self._status_rate.allow(node_id, now):
                    del self._held[node_id]
                    slot.queued = True
                    queued.append(slot)
        for slot in queued:
            self.control.put(slot)
        return len(queued)


def api_error(rejected: Rejected) -> tuple[ApiErrorCode, str]:
    """The API's answer to a request its route refused."""
    if rejected.problem is Problem.TOO_LARGE:
        return ApiErrorCode.TOO_LARGE, f"request refused: {rejected.reason}"
    return ApiErrorCode.BAD_REQUEST, f"not an ApiRequest: {rejected.reason}"
