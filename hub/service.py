"""The hub daemon: wiring, threads and the one stop event.

Threads: paho's network thread only checks each message and hands it over without
ever waiting (hub/intake.py, hub/handover.py), and so do the broker's
acknowledgements of the desired models the hub writes; `fetch-N` workers serve
bundle chunks; the `control` thread does everything that changes state, in order
(API calls, uploads, node status/telemetry/update reports, desired
acknowledgements) and ticks the rollout engine every `tick_s`, and as soon as it
has caught up with the fleet's messages. A message is acknowledged to the broker
only after it was handled; handling that fails for a database or disk error is
tried again a few times first (persistent session, so reports sent while the hub
was down arrive when it is back). The hub's Receive Maximum (`limits.receive_maximum`)
bounds the messages the broker hands it unacknowledged. With `[http] enabled`, the
`hub-http` thread serves the read-only fleet page, /api and /metrics (hub/web/): it
reads the database through its own connection and the thread-safe snapshots below,
never a lock the network or control thread waits on.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
from pydantic import ValidationError

from cellwatch.hub.api import Api, error_reply
from cellwatch.hub.config import HubSettings
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure, HubError
from cellwatch.hub.fetch import FetchServer, props_of
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.handover import Handover
from cellwatch.hub.intake import Confirmed, Incoming, Intake, Item, Kind, Oversized
from cellwatch.hub.orchestrator import Orchestrator
from cellwatch.hub.registry import Registry
from cellwatch.hub.rollout import Desired
from cellwatch.hub.served import ServedTotals
from cellwatch.hub.store import BundleStore
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.daemon import Daemon
from cellwatch.shared.errors import MqttError, TopicError
from cellwatch.shared.hubapi import UPLOAD_VERB
from cellwatch.shared.mqtt import MqttClient, PublishProps, user_properties
from cellwatch.shared.schemas import (
    ApiReply,
    DesiredModel,
    NodeStatus,
    Telemetry,
    UpdateReport,
)
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

if TYPE_CHECKING:
    from cellwatch.hub.web.server import HttpServer

log = logging.getLogger(__name__)

FETCH_QUEUE = 256
RETRY_DELAYS_S = (0.1, 0.5, 2.0)
"""Handling a message that failed with a database or disk error is tried again after
each of these delays; then the message is acknowledged and counted `handling_failed`."""
RETRYABLE = (sqlite3.Error, OSError)


def _nothing() -> None:
    pass


class HubService(Daemon):
    """One hub. `start()`, then `stop()` (e.g. from a signal) and `join()`."""

    def __init__(self, settings: HubSettings) -> None:
        super().__init__("hub")
        self.settings = settings
        self.topics = Topics(settings.mqtt.topic_prefix)
        self._api_prefix = self.topics.hub_api(UPLOAD_VERB)[: -len(UPLOAD_VERB)]
        self._replies_prefix = self.topics.hub_replies("x", "y")[: -len("x/y")]
        self.db = Database(settings.db_path)
        self.store = BundleStore(settings.store_dir)
        trusted = TrustedKeys.load(settings.trusted_keys)
        if not trusted.keys and not settings.allow_unsigned:
            log.warning("hub: no trusted keys configured: every push will be refused")
        self.registry = Registry(
            self.db, self.store, trusted, allow_unsigned=settings.allow_unsigned
        )
        self.counters = HubCounters()
        self.fleet = Fleet(self.db, max_nodes=settings.limits.max_nodes)
        t = self.topics
        self.mqtt = MqttClient(
            settings.mqtt,
            client_id=settings.client_id,
            clean_start=False,
            receive_maximum=settings.limits.receive_maximum,
            manual_ack=True,
            subscriptions=[
                (t.node_filter("status"), 1),
                (t.node_filter("telemetry"), 0),
                (t.node_filter("update"), 1),
                (t.hub_fetch_filter(), 1),
                (t.hub_api_filter(), 1),
            ],
        )
        self.fetch = FetchServer(self.store, t, self._send, settings.max_chunk_bytes)
        self.served = ServedTotals(self.fetch, self.db)
        self.orchestrator = Orchestrator(
            self.db,
            self.fleet,
            self.registry,
            settings.rollout,
            self._write_desired,
            self._publish_revocations,
        )
        self.api = Api(self.db, self.registry, self.fleet, self.orchestrator, self.served)
        self._control: Handover[Item] = Handover()
        self._fetch: queue.Queue[tuple[paho.MQTTMessage, int] | None] = queue.Queue(
            maxsize=FETCH_QUEUE
        )
        self.intake = Intake(
            t,
            settings.limits,
            self.counters,
            self._control,
            self._fetch,
            ack=lambda msg, generation: self.mqtt.ack(msg.mid, msg.qos, generation),
            generation=lambda: self.mqtt.generation,
        )
        self.mqtt.set_message_handler(self.intake.on_message)
        self.http: HttpServer | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Reload the rollouts, listen (HubError if it cannot), connect (MqttError if the
        broker refuses) and serve."""
        self.orchestrator.load()
        try:
            self._start_http()
        except HubError:
            self.db.close()
            raise
        self._spawn(self._control_loop, "control")
        for i in range(self.settings.fetch_workers):
            self._spawn(self._fetch_loop, f"fetch-{i}")
        try:
            self.mqtt.connect()
        except MqttError:
            self._stop_threads()
            self._stop_http()
            self.db.close()
            raise
        # The broker handles one connection's packets in order: once this publish is
        # acknowledged, our subscriptions are active (no request is missed at start).
        if not self.mqtt.publish_wait(self.topics.hub_replies("hub", "started"), b"", qos=1):
            log.warning("hub: the broker did not acknowledge the start marker")
        self._control.put(lambda: self._publish_revocations(time.time()))
        self._control.put(self.orchestrator.rewrite_unconfirmed)
        log.info(
            "hub: serving (data %s, %d rollouts active)",
            self.settings.data_dir,
            len(self.orchestrator.active),
        )

    def join(self) -> None:
        """Finish the queued work, disconnect and close the database."""
        self._stop.set()
        self._stop_http()
        self.mqtt.disconnect()
        self._stop_threads()
        try:
            self.served.store(self.db)
        except sqlite3.Error as exc:
            log.error("hub: cannot store the bytes served: %s", exc)
        self.db.close()
        log.info("hub: stopped")

    def _start_http(self) -> None:
        if not self.settings.http.enabled:
            return
        # Imported here: the operator's commands (same CLI) need no HTTP stack.
        from cellwatch.hub.web.reader import HubSources
        from cellwatch.hub.web.server import HttpServer

        sources = HubSources(
            db_path=self.settings.db_path,
            history=self.fleet.history,
            served=self.served,
            counters=self.counters,
            control_depth=self._control.__len__,
            control_peak=lambda: self._control.peak,
            started_at=self.api.started_at,
        )
        self.http = HttpServer(self.settings.http, sources)
        self.http.start()

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()

    def _stop_threads(self) -> None:
        self._stop.set()
        self._control.put(None)
        for _ in range(self.settings.fetch_workers):
            self._fetch.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    # -- workers -------------------------------------------------------------------------
    def _fetch_loop(self) -> None:
        while True:
            item = self._fetch.get()
            if item is None:
                return
            msg, generation = item
            try:
                self.fetch.handle(msg)
            except Exception:  # keep serving whatever one request did
                log.exception("fetch: request on %s failed", msg.topic)
            finally:
                self.mqtt.ack(msg.mid, msg.qos, generation)

    def _control_loop(self) -> None:
        tick_s = self.settings.tick_s
        next_tick = time.monotonic()
        tick_wanted = False
        while True:
            try:
                item = self._control.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = _nothing  # just tick
            if item is None:
                return
            try:
                tick_wanted = self._run(item) or tick_wanted
                # Right after the fleet's news once caught up with them; under load, at
                # least every tick_s.
                if time.monotonic() >= next_tick or (tick_wanted and not len(self._control)):
                    tick_wanted = False
                    next_tick = time.monotonic() + tick_s
                    self.orchestrator.tick(time.time())
                    self.served.store(self.db)
            except Exception:  # one bad step must not stop the rollouts
                log.exception("hub: control step failed")

    # -- control thread ------------------------------------------------------------------
    def _run(self, item: Item) -> bool:
        """Do one item of the control queue; True when the rollout engine should tick."""
        if isinstance(item, Incoming):
            msg, generation, status = self.intake.take(item)
            try:
                return self._handle_with_retry(item.kind, msg, status)
            finally:
                self.mqtt.ack(msg.mid, msg.qos, generation)
        if isinstance(item, Confirmed):
            self.orchestrator.on_confirmed(item.desired)
        elif isinstance(item, Oversized):
            message = f"request is {item.size} bytes, over {item.limit}"
            self._reply_to(
                item.topic,
                item.response_topic,
                item.correlation,
                error_reply(None, ApiErrorCode.TOO_LARGE, message),
            )
        elif item is not None:
            item()
        return False

    def _handle_with_retry(
        self, kind: Kind, msg: paho.MQTTMessage, status: NodeStatus | None = None
    ) -> bool:
        """Handle msg; a database or disk error is retried after RETRY_DELAYS_S. The
        caller acknowledges the message afterwards, whatever happened."""
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
            try:
                return self._handle(kind, msg, status)
            except RETRYABLE as exc:
                if delay is None or self._stop.is_set():
                    self.counters.dropped(DropReason.HANDLING_FAILED)
                    log.error("hub: giving up on %s after %d attempts: %s", msg.topic, attempt, exc)
                    return False
                log.warning(
                    "hub: handling %s failed (%s); trying again in %.1f s", msg.topic, exc, delay
                )
                self._stop.wait(delay)
            except Exception:  # a bug: trying again would fail again
                self.counters.dropped(DropReason.HANDLING_FAILED)
                log.exception("hub: handling %s failed", msg.topic)
                return False
        return False

    def _handle(self, kind: Kind, msg: paho.MQTTMessage, parsed: NodeStatus | None = None) -> bool:
        """Handle one message (parsed: its status, validated on the way in); True when
        the rollout engine should tick."""
        topic, now = msg.topic, time.time()
        if kind is Kind.API:
            verb = topic[len(self._api_prefix) :]
            if verb == UPLOAD_VERB:
                self._reply(msg, self._upload(msg))
            else:
                self._reply(msg, self.api.handle(verb, bytes(msg.payload), now))
            return False
        try:
            node_id = self.topics.node_id_of(topic)
        except TopicError:
            log.warning("hub: message on unexpected topic %s", topic)
            return False
        if not msg.payload:
            return False  # a retained message being cleared
        try:
            if kind is Kind.STATUS:
                status = parsed or NodeStatus.model_validate_json(msg.payload)
                if self._same_node(node_id, status.node_id, kind):
                    return self._on_status(status, live=not msg.retain, now=now)
            elif kind is Kind.TELEMETRY:
                telemetry = Telemetry.model_validate_json(msg.payload)
                same = self._same_node(node_id, telemetry.node_id, kind)
                if same and not self.fleet.on_telemetry(telemetry, now):
                    self.counters.dropped(DropReason.TOO_MANY_NODES)
            elif kind is Kind.UPDATE:
                report = UpdateReport.model_validate_json(msg.payload)
                if not self.fleet.on_update(node_id, report, now):
                    self.counters.dropped(DropReason.TOO_MANY_NODES)
                    return False
                self.orchestrator.on_report(node_id, report, now)
                return True
        except ValidationError as exc:
            self.counters.dropped(DropReason.MALFORMED)
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            log.warning("node %s: malformed %s ignored: %s: %s", node_id, kind, where, err["msg"])
        return False

    def _on_status(self, status: NodeStatus, *, live: bool, now: float) -> bool:
        outcome = self.fleet.on_status(status, now)
        if outcome is None:
            self.counters.dropped(DropReason.TOO_MANY_NODES)
            return False
        if outcome and live and status.state == "online":
            # A node that (re)connected: the broker may have lost its retained desired
            # (a broker restart within its autosave interval): say it again.
            self.orchestrator.reassert(status.node_id)
        return outcome

    def _same_node(self, topic_node: str, payload_node: str, kind: Kind) -> bool:
        if topic_node != payload_node:
            self.counters.dropped(DropReason.WRONG_NODE)
            log.warning("node %s: %s names node %s: ignored", topic_node, kind, payload_node)
            return False
        return True

    def _upload(self, msg: paho.MQTTMessage) -> ApiReply:
        props = user_properties(msg)
        try:
            upload_id, name, sha = props["upload_id"], props["file"], props["sha256"]
            offset = int(props["offset"])
        except (KeyError, ValueError):
            return error_reply(
                None,
                ApiErrorCode.BAD_REQUEST,
                "upload needs user properties upload_id, file, offset, sha256",
            )
        try:
            ack = self.registry.upload(upload_id, name, offset, sha, bytes(msg.payload))
        except ApiFailure as exc:
            return error_reply(None, exc.code, exc.message)
        return ApiReply(request_id=None, ok=True, data=ack.model_dump(mode="json"))

    def _reply(self, msg: paho.MQTTMessage, reply: ApiReply) -> None:
        rt, corr = props_of(msg)
        self._reply_to(msg.topic, rt, corr, reply)

    def _reply_to(self, topic: str, rt: str | None, corr: bytes | None, reply: ApiReply) -> None:
        if rt is None or not rt.startswith(self._replies_prefix) or any(c in rt for c in "+#"):
            log.warning(
                "api: %s without a Response Topic under %s: no reply (%s)",
                topic,
                self._replies_prefix,
                reply.error.code if reply.error else "ok",
            )
            return
        self._send(rt, reply.to_json(), PublishProps(correlation_data=corr))

    def _send(self, topic: str, payload: bytes, props: PublishProps) -> None:
        self.mqtt.publish(topic, payload, qos=1, props=props)

    def _publish_revocations(self, now: float) -> None:
        """The revocation list, retained for the nodes (at start and after a revoke)."""
        revoked = self.registry.revocations(now)
        self.mqtt.publish(self.topics.hub_revoked(), revoked.to_json(), qos=1, retain=True)
        log.info("hub: revocation list published (%d revoked)", len(revoked.revoked))

    def _write_desired(self, d: Desired) -> None:
        desired = DesiredModel(
            rollout_id=d.rollout_id,
            model=d.model,
            issued_at=datetime.fromtimestamp(d.issued_at, UTC),
        )

        def done(ok: bool) -> None:
            # paho's network thread, inside its outgoing-message lock (or this thread,
            # when the acknowledgement beat publish() back): hand over, never wait.
            if ok:
                self._control.put(Confirmed(d))
            else:
                log.error("rollout %s: the broker refused desired for %s", d.rollout_id, d.node_id)

        self.mqtt.publish(
            self.topics.desired(d.node_id), desired.to_json(), qos=1, retain=True, on_done=done
        )
        log.info("rollout %s: node %s: desired %s written", d.rollout_id, d.node_id, d.model)
