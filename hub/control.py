"""The hub's control thread: everything that changes state, in order.

It takes the items the routes (hub/intake.py) and the broker's acknowledgements hand
over: node statuses, telemetry and update reports, API calls and upload chunks,
confirmed desired models, and tasks. It ticks the rollout engine every `tick_s`, and
as soon as it has caught up with the fleet's news. A message is acknowledged to the
broker only after it was handled; handling that fails for a database or disk error
is tried again after each of RETRY_DELAYS_S first (persistent session, so reports
sent while the hub was down arrive when it is back), then acknowledged and counted
`handling_failed`.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from typing import Any

from cellwatch.hub.api import Api, error_reply
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.intake import Confirmed, Incoming, Intake, Item, api_error
from cellwatch.hub.orchestrator import Orchestrator, ShadowOutcome
from cellwatch.hub.registry import Registry
from cellwatch.hub.served import ServedTotals
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import MqttError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.rpc import Delivery, Inbound, Rejected, RemoteError
from cellwatch.shared.rpc.transfer import read_chunk
from cellwatch.shared.schemas import (
    ApiReply,
    ApiRequest,
    NodeStatus,
    ShadowReport,
    Telemetry,
    UpdateReport,
)
from cellwatch.shared.states import NodeState
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.1, 0.5, 2.0)
"""Handling a message that failed with a database or disk error is tried again after
each of these delays; then the message is acknowledged and counted `handling_failed`."""
RETRYABLE = (sqlite3.Error, OSError)


def _nothing() -> None:
    pass


class Control:
    def __init__(
        self,
        *,
        topics: Topics,
        db: Database,
        fleet: Fleet,
        registry: Registry,
        orchestrator: Orchestrator,
        api: Api,
        served: ServedTotals,
        counters: HubCounters,
        queue: Handoff[Item],
        tick_s: float,
        stop: threading.Event,
    ) -> None:
        self.topics = topics
        self.db = db
        self.fleet = fleet
        self.registry = registry
        self.orchestrator = orchestrator
        self.api = api
        self.served = served
        self.counters = counters
        self.queue = queue
        self.tick_s = tick_s
        self._stop = stop
        self.intake: Intake | None = None
        """Set by the service (the intake hands its items here)."""

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """The control thread, until a None item."""
        next_tick = time.monotonic()
        tick_wanted = False
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = _nothing  # just tick
            if item is None:
                return
            try:
                tick_wanted = self.handle(item) or tick_wanted
                # Right after the fleet's news once caught up with them; under load, at
                # least every tick_s.
                if time.monotonic() >= next_tick or (tick_wanted and not len(self.queue)):
                    tick_wanted = False
                    next_tick = time.monotonic() + self.tick_s
                    self.orchestrator.tick(time.time())
                    self.served.store(self.db)
            except Exception:  # one bad step must not stop the rollouts
                log.exception("hub: control step failed")

    def handle(self, item: Item) -> bool:
        """Do one item of the control queue; True when the rollout engine should tick."""
        if isinstance(item, Incoming):
            assert self.intake is not None
            inbound = self.intake.take(item)
            try:
                return self._with_retry(item, inbound)
            finally:
                inbound.ack()
        if isinstance(item, Confirmed):
            self.orchestrator.on_confirmed(item.desired)
        elif item is not None:
            item()
        return False

    def _with_retry(self, item: Incoming, inbound: Inbound[Any]) -> bool:
        """Handle a message; a database or disk error is retried after RETRY_DELAYS_S.
        The caller acknowledges the message afterwards, whatever happened."""
        topic = inbound.topic
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
            try:
                return item.handle(inbound, item.node_id)
            except RETRYABLE as exc:
                if delay is None or self._stop.is_set():
                    self.counters.dropped(DropReason.HANDLING_FAILED)
                    log.error("hub: giving up on %s after %d attempts: %s", topic, attempt, exc)
                    return False
                log.warning(
                    "hub: handling %s failed (%s); trying again in %.1f s", topic, exc, delay
                )
                self._stop.wait(delay)
            except Exception:  # a bug: trying again would fail again
                self.counters.dropped(DropReason.HANDLING_FAILED)
                log.exception("hub: handling %s failed", topic)
                return False
        return False

    # -- the fleet's messages ------------------------------------------------------------
    def on_status(self, inbound: Inbound[NodeStatus], node_id: str) -> bool:
        status = inbound.body
        outcome = self.fleet.on_status(status, time.time())
        if outcome is None:
            self.counters.dropped(DropReason.TOO_MANY_NODES)
            return False
        if outcome and not inbound.message.retained and status.state is NodeState.ONLINE:
            # A node that (re)connected: the broker may have lost its retained desired
            # (a broker restart within its autosave interval): say it again.
            self.orchestrator.reassert(status.node_id)
        return outcome

    def on_telemetry(self, inbound: Inbound[Telemetry], node_id: str) -> bool:
        if not self.fleet.on_telemetry(inbound.body, time.time()):
            self.counters.dropped(DropReason.TOO_MANY_NODES)
        return False

    def on_update(self, inbound: Inbound[UpdateReport], node_id: str) -> bool:
        now = time.time()
        if not self.fleet.on_update(node_id, inbound.body, now):
            self.counters.dropped(DropReason.TOO_MANY_NODES)
            return False
        self.orchestrator.on_report(node_id, inbound.body, now)
        return True

    def on_shadow(self, inbound: Inbound[ShadowReport], node_id: str) -> bool:
        now = time.time()
        outcome = self.orchestrator.on_shadow_report(node_id, inbound.body, now)
        if outcome is not ShadowOutcome.TAKEN:
            self.counters.dropped(DropReason(outcome.value))
        return outcome is not ShadowOutcome.UNKNOWN_ROLLOUT and outcome is not (
            ShadowOutcome.NOT_A_TARGET
        )

    # -- the operator's ------------------------------------------------------------------
    def on_api(self, inbound: Inbound[ApiRequest], node_id: str) -> bool:
        verb = self.topics.hub_api_verb_of(inbound.topic)
        self._reply(inbound, self.api.handle(verb, inbound.body, time.time()))
        return False

    def on_upload(self, inbound: Inbound[bytes], node_id: str) -> bool:
        """A chunk of a bundle push (the one chunk format, shared/rpc/transfer.py)."""
        user = inbound.message.user
        try:
            upload_id, name = user["upload_id"], user["file"]
            chunk = read_chunk(inbound.message)
        except (KeyError, ValueError, RemoteError) as exc:
            message = "upload needs user properties upload_id, file, offset, sha256"
            if isinstance(exc, ValueError):
                message = f"{message}: {exc}"
            self._reply(inbound, error_reply(None, ApiErrorCode.BAD_REQUEST, message))
            return False
        try:
            ack = self.registry.upload(upload_id, name, chunk)
        except ApiFailure as exc:
            self._reply(inbound, error_reply(None, exc.code, exc.message))
            return False
        self._reply(inbound, ApiReply(request_id=None, ok=True, data=ack.model_dump(mode="json")))
        return False

    def refuse_api(self, rejected: Rejected) -> None:
        """Network thread: an API request or upload chunk over its cap, or malformed:
        answered without queueing its payload."""
        code, message = api_error(rejected)
        if code is ApiErrorCode.TOO_LARGE:
            self.counters.dropped(DropReason.TOO_LARGE)
            log.warning("api: a request on %s refused unread: %s", rejected.topic, message)
        self._reply(rejected, error_reply(None, code, message))
        rejected.ack()

    def _reply(self, delivery: Delivery, reply: ApiReply) -> None:
        try:
            sent = delivery.reply(reply.to_json())
        except MqttError as exc:
            log.error("api: cannot answer %s: %s", delivery.topic, exc)
            return
        if not sent:
            log.warning(
                "api: %s without a Response Topic under %s: no reply (%s)",
                delivery.topic,
                self.topics.hub_replies_filter(),
                reply.error.code if reply.error else "ok",
            )
