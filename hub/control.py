"""The hub's control thread: everything that changes state, in order.

It takes the items the routes (hub/intake.py) and the broker's acknowledgements hand
over: node statuses (a slot per node), telemetry, update and shadow reports, API calls
and upload chunks, the retained revocation list, confirmed desired models, and tasks. It
ticks the rollout engine every `tick_s`, and as soon as it has caught up with the
fleet's news; each tick also queues the statuses a node's rate held back. A message
is acknowledged to the broker only after it was handled (persistent session, so
reports sent while the hub was down arrive when it is back).

A database that cannot be written (another process holds a lock on it, a full disk)
stalls the thread for one busy timeout (hub/db.py, BUSY_TIMEOUT_S), not once per
message: from the first such error on, the database is taken for unwritable, and
messages are not handled but kept, each as its kind says (`intake.Outage`): a node's
statuses wait in its slot (newer ones still replace older ones), update and shadow
reports and the revocation list wait in order, telemetry is dropped (counted `database`), API
calls are answered (a read works; a write fails with `internal`), and the rollout
engine does not tick (nor are the nodes' figures written, hub/fleet.py). It tries
again after RETRY_FIRST_S, then twice as long each time up to RETRY_MAX_S; once a
write works, what waited is applied, in order, and acknowledged. Nothing is lost, and
the latest status of each node is applied.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from cellwatch.hub.api import Api, error_reply
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.intake import (
    Confirmed,
    Incoming,
    Intake,
    Item,
    Outage,
    StatusSlot,
    api_error,
)
from cellwatch.hub.orchestrator import Orchestrator, ShadowOutcome
from cellwatch.hub.registry import Registry
from cellwatch.hub.served import ServedTotals
from cellwatch.hub.sites import LINK_DOWN, LINK_UP
from cellwatch.shared.base import first_problem
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import MqttError, TopicError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.hubapi import RevokeArgs
from cellwatch.shared.rpc import Delivery, Inbound, Rejected, RemoteError
from cellwatch.shared.rpc.transfer import read_chunk
from cellwatch.shared.sampletransfer import SAMPLE_PROPERTY, SampleOffer
from cellwatch.shared.schemas import (
    ApiReply,
    ApiRequest,
    NodeStatus,
    RevocationList,
    ShadowReport,
    Telemetry,
    UpdateReport,
)
from cellwatch.shared.states import NodeState
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

RETRY_FIRST_S = 1.0
"""After the database could not be written, the first try again comes this much later;
each that fails doubles the wait, up to RETRY_MAX_S."""
RETRY_MAX_S = 30.0
UNWRITABLE = (sqlite3.Error, OSError)
"""What a database (or disk) that cannot be written raises."""


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
        self._waiting: deque[Incoming] = deque()
        """Messages that wait for the database to be writable again, in order."""
        self._retry_at: float | None = None
        """After the database could not be written: when to try again (monotonic)."""
        self._retry_s = RETRY_FIRST_S
        self._down_since: float | None = None
        """When the database could first not be written (None: it can)."""

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
                self._flush()
                return
            try:
                tick_wanted = self.handle(item) or tick_wanted
                # Right after the fleet's news once caught up with them; under load, at
                # least every tick_s.
                if time.monotonic() >= next_tick or (tick_wanted and not len(self.queue)):
                    tick_wanted = False
                    next_tick = time.monotonic() + self.tick_s
                    self.tick()
            except Exception:  # one bad step must not stop the rollouts
                log.exception("hub: control step failed")

    def tick(self) -> None:
        """Apply what waited for the database once it is time to try again; queue the
        statuses held back; tick the rollout engine and store the bytes served."""
        assert self.intake is not None
        if self.unwritable or not self._replay():
            return
        self.intake.release(time.monotonic())
        try:
            self.fleet.flush()
            self.orchestrator.tick(time.time())
            self.served.store(self.db)
        except UNWRITABLE as exc:
            self._failed(exc, "the rollout engine's tick")

    def _flush(self) -> None:
        """The telemetry not yet written, at the end (hub/fleet.py)."""
        try:
            self.fleet.flush()
        except UNWRITABLE as exc:
            log.error("hub: the last telemetry could not be written: %s", exc)

    def handle(self, item: Item) -> bool:
        """Do one item of the control queue; True when the rollout engine should tick."""
        if isinstance(item, StatusSlot):
            return self._statuses(item)
        if isinstance(item, Incoming):
            assert self.intake is not None
            inbound = self.intake.take(item)
            if item.outage is not Outage.TRY and (self.unwritable or self._waiting):
                self._keep(item)  # (after the ones waiting: in order)
                return False
            outcome = self._attempt(item, inbound)
            if outcome is None and item.outage is not Outage.TRY:
                self._keep(item)
                return False
            inbound.ack()
            return bool(outcome)
        if isinstance(item, Confirmed):
            self.orchestrator.on_confirmed(item.desired)
        elif item is not None:
            item()
        return False

    def _statuses(self, slot: StatusSlot) -> bool:
        """A node's statuses, in order; those the database does not take wait in its
        slot (given back to the intake)."""
        assert self.intake is not None
        statuses = self.intake.take_statuses(slot)
        tick = False
        for i, inbound in enumerate(statuses):
            outcome = None
            if not self.unwritable:
                status = Incoming(self.on_status, inbound, slot.node_id, Outage.WAIT)
                outcome = self._attempt(status, inbound)
            if outcome is None:
                self.intake.give_back(slot.node_id, statuses[i:])
                break
            inbound.ack()
            tick = tick or outcome
        return tick

    def _attempt(self, item: Incoming, inbound: Inbound[Any]) -> bool | None:
        """Handle a message once: whether the rollout engine should tick, or None when
        the database could not be written."""
        try:
            outcome = item.handle(inbound, item.node_id)
        except UNWRITABLE as exc:
            self._failed(exc, inbound.topic)
            return None
        except Exception:  # a bug: trying again would fail again
            self.counters.dropped(DropReason.HANDLING_FAILED)
            log.exception("hub: handling %s failed", inbound.topic)
            return False
        if self._down_since is not None and item.outage is not Outage.TRY:
            self._recovered()
        return outcome

    def _keep(self, item: Incoming) -> None:
        """A message that came (or failed) while the database is unwritable."""
        if item.outage is Outage.WAIT:
            self._waiting.append(item)
        else:
            self.counters.dropped(DropReason.DATABASE)
            item.inbound.ack()

    # -- an unwritable database ----------------------------------------------------------
    @property
    def unwritable(self) -> bool:
        """The database could not be written, and it is not yet time to try again."""
        return self._retry_at is not None and time.monotonic() < self._retry_at

    def _failed(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._retry_s, self._down_since = RETRY_FIRST_S, now
            log.error(
                "hub: cannot write the database (%s, handling %s): node statuses, update "
                "and shadow reports and revocations wait (unacknowledged), telemetry is "
                "dropped; trying again in %.0f s",
                exc,
                what,
                self._retry_s,
            )
        else:
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            log.debug("hub: the database is still not writable (%s)", exc)
        self._retry_at = now + self._retry_s

    def _recovered(self) -> None:
        assert self._down_since is not None
        log.warning(
            "hub: the database is writable again after %.0f s: what waited is applied",
            time.monotonic() - self._down_since,
        )
        self._down_since = self._retry_at = None

    def _replay(self) -> bool:
        """Apply what waited for the database, in order; False if it still cannot be
        written."""
        while self._waiting:
            item = self._waiting[0]
            if self._attempt(item, item.inbound) is None:
                return False
            self._waiting.popleft()
            item.inbound.ack()
        return True

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

    def on_revocations(self, inbound: Inbound[RevocationList], node_id: str) -> bool:
        """The revocation list on the broker (retained; only the hub's account may write
        it): learn each signed revocation this hub does not know (hub/intake.py). Of a
        model it stores, as `models revoke` does (its rollouts aborted, desired models
        moved off it, the list published); of another, the registry keeps it (no push
        or rollout of it, no file served). A list that leaves out one this hub knows
        (written by an impostor with the hub's password, or by a hub restored from an
        older backup) is replaced by this hub's at once, so nodes that start later
        read them all."""
        now = time.time()
        learnt = 0
        for rev in inbound.body.revoked:
            if self.registry.knows(rev):
                continue
            stored = self.db.model(rev.name, rev.version)
            try:
                if stored is not None and stored.manifest_sha256 == rev.manifest_sha256:
                    self.orchestrator.revoke(RevokeArgs(revocation=rev), now)
                else:
                    learnt += self.registry.add_revocation(rev, now)
            except ApiFailure as exc:
                log.error("hub: %s: a revocation no trusted key signed: %s", inbound.topic, exc)
        missing = self.registry.revocations(now).shas() - inbound.body.shas()
        if missing:
            log.warning(
                "hub: the revocation list on %s leaves out %d this hub knows: publishing "
                "them again",
                inbound.topic,
                len(missing),
            )
        if learnt or missing:
            self.orchestrator.publish_revocations(now)
        return False

    def on_site_link(self, inbound: Inbound[bytes], node_id: str) -> bool:
        """A site's bridge link changed (hub/sites.py): its nodes are unreachable while
        it is down; the rollout engine ticks to stop or restart their clocks."""
        try:
            site = self.topics.site_of_link(inbound.topic)
        except TopicError as exc:
            log.warning("hub: %s", exc)
            return False
        payload = inbound.message.payload
        if payload not in (LINK_UP, LINK_DOWN):
            log.warning("hub: %s: %r is not a bridge notification (0 or 1)", inbound.topic, payload)
            return False
        return self.fleet.sites.on_link(site, payload == LINK_UP, time.time())

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
            ack = self.api.push.upload(upload_id, name, chunk)
        except ApiFailure as exc:
            self._reply(inbound, error_reply(None, exc.code, exc.message))
            return False
        self._reply(inbound, ApiReply(request_id=None, ok=True, data=ack.model_dump(mode="json")))
        return False

    # -- the nodes' field samples (hub/samples.py) ---------------------------------------
    def on_sample_offer(self, inbound: Inbound[bytes], node_id: str) -> bool:
        def run() -> BaseModel:
            offer = SampleOffer.model_validate_json(inbound.body)
            return self.api.samples_store().offer(node_id, offer, time.time())

        self._reply(inbound, _answer(run, "sample offer"))
        return False

    def on_sample_chunk(self, inbound: Inbound[bytes], node_id: str) -> bool:
        def run() -> BaseModel:
            try:
                sample = inbound.message.user[SAMPLE_PROPERTY]
                chunk = read_chunk(inbound.message)
            except (KeyError, ValueError, RemoteError) as exc:
                raise ApiFailure(
                    ApiErrorCode.BAD_REQUEST,
                    f"a sample chunk needs user properties sample, offset, sha256: {exc}",
                ) from exc
            return self.api.samples_store().chunk(node_id, sample, chunk, time.time())

        self._reply(inbound, _answer(run, "sample chunk"))
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


def _answer(run: Callable[[], BaseModel], what: str) -> ApiReply:
    """ok with run()'s model, or the error it raised (ApiFailure, a model that does not
    validate). A database or disk that cannot be written passes (the control thread's
    outage rules)."""
    try:
        data = run()
    except ApiFailure as exc:
        log.info("hub: %s refused: %s: %s", what, exc.code, exc.message)
        return error_reply(None, exc.code, exc.message)
    except ValidationError as exc:
        return error_reply(None, ApiErrorCode.BAD_REQUEST, f"{what}: {first_problem(exc)}")
    return ApiReply(request_id=None, ok=True, data=data.model_dump(mode="json"))
