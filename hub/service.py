"""The hub daemon: wiring, threads and the one stop event.

Threads: paho's network thread only routes each message into a bounded queue;
`fetch-N` workers serve bundle chunks; the `control` thread does everything that
changes state, in order (API calls, uploads, node status/telemetry/update
reports, desired acknowledgements) and ticks the rollout engine every `tick_s`
(and right after each fleet message). Messages are acknowledged to the broker
after they were handled (persistent session, so reports sent while the hub was
down arrive when it is back). With `[http] enabled`, the `hub-http` thread serves
the read-only fleet page, /api and /metrics (hub/web/): it reads the database
through its own connection and the thread-safe snapshots below, never a lock the
network or control thread waits on.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
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
from cellwatch.hub.orchestrator import Orchestrator
from cellwatch.hub.registry import Registry
from cellwatch.hub.rollout import Desired
from cellwatch.hub.store import BundleStore
from cellwatch.shared.daemon import Daemon
from cellwatch.shared.errors import MqttError, TopicError
from cellwatch.shared.hubapi import UPLOAD_VERB
from cellwatch.shared.mqtt import MqttClient, PublishProps, user_properties
from cellwatch.shared.schemas import (
    ApiReply,
    DesiredModel,
    DesiredModelRef,
    NodeStatus,
    Telemetry,
    UpdateReport,
    utcnow,
)
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

if TYPE_CHECKING:
    from cellwatch.hub.web.server import HttpServer

log = logging.getLogger(__name__)

CONTROL_QUEUE = 1000
FETCH_QUEUE = 256
Task = Callable[[], None]
Item = tuple[paho.MQTTMessage, int] | Task | None


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
        self._fetch_prefix = self.topics.hub_fetch_filter()[:-1]
        self.db = Database(settings.db_path)
        self.store = BundleStore(settings.store_dir)
        trusted = TrustedKeys.load(settings.trusted_keys)
        if not trusted.keys and not settings.allow_unsigned:
            log.warning("hub: no trusted keys configured: every push will be refused")
        self.registry = Registry(
            self.db, self.store, trusted, allow_unsigned=settings.allow_unsigned
        )
        self.fleet = Fleet(self.db)
        t = self.topics
        self.mqtt = MqttClient(
            settings.mqtt,
            client_id=settings.client_id,
            clean_start=False,
            manual_ack=True,
            subscriptions=[
                (t.node_filter("status"), 1),
                (t.node_filter("telemetry"), 0),
                (t.node_filter("update"), 1),
                (t.hub_fetch_filter(), 1),
                (t.hub_api_filter(), 1),
            ],
        )
        self.mqtt.set_message_handler(self._on_message)
        self.fetch = FetchServer(self.store, t, self._send, settings.max_chunk_bytes)
        self.orchestrator = Orchestrator(
            self.db, self.fleet, self.registry, settings.rollout, self._write_desired
        )
        self.api = Api(self.db, self.registry, self.fleet, self.orchestrator, self.fetch)
        self._control: queue.Queue[Item] = queue.Queue(maxsize=CONTROL_QUEUE)
        self._fetch: queue.Queue[tuple[paho.MQTTMessage, int] | None] = queue.Queue(
            maxsize=FETCH_QUEUE
        )
        self.counters = HubCounters()
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
            fetch=self.fetch,
            counters=self.counters,
            control_depth=self._control.qsize,
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

    # -- network thread ------------------------------------------------------------------
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        item = (msg, self.mqtt.generation)
        if msg.topic.startswith(self._fetch_prefix):
            try:
                self._fetch.put_nowait(item)
            except queue.Full:
                self.counters.dropped(DropReason.FETCH_QUEUE_FULL)
                log.warning("fetch: queue full, dropping a request (the node asks again)")
                self.mqtt.ack(msg.mid, msg.qos, item[1])
            return
        self._control.put(item)  # bounded: a flood pushes back on the broker

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
        while True:
            try:
                item = self._control.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = _nothing  # just tick
            if item is None:
                return
            tick_now = False
            try:
                if isinstance(item, tuple):
                    msg, generation = item
                    try:
                        tick_now = self._handle(msg)
                    finally:
                        self.mqtt.ack(msg.mid, msg.qos, generation)
                elif callable(item):
                    item()
                if tick_now or time.monotonic() >= next_tick:
                    self.orchestrator.tick(time.time())
                    next_tick = time.monotonic() + tick_s
            except Exception:  # one bad message must not stop the rollouts
                log.exception("hub: control step failed")

    # -- control thread ------------------------------------------------------------------
    def _handle(self, msg: paho.MQTTMessage) -> bool:
        """Handle one message; True when the rollout engine should tick now."""
        topic, now = msg.topic, time.time()
        if topic.startswith(self._api_prefix):
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
        leaf = topic.rsplit("/", 1)[-1]
        try:
            if leaf == "status":
                status = NodeStatus.model_validate_json(msg.payload)
                if self._same_node(node_id, status.node_id, leaf):
                    self.fleet.on_status(status, now)
            elif leaf == "telemetry":
                telemetry = Telemetry.model_validate_json(msg.payload)
                if self._same_node(node_id, telemetry.node_id, leaf):
                    self.fleet.on_telemetry(telemetry, now)
                return False
            elif leaf == "update":
                report = UpdateReport.model_validate_json(msg.payload)
                self.fleet.on_update(node_id, report, now)
                self.orchestrator.on_report(node_id, report, now)
        except ValidationError as exc:
            self.counters.dropped(DropReason.MALFORMED)
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            log.warning("node %s: malformed %s ignored: %s: %s", node_id, leaf, where, err["msg"])
            return False
        return True

    def _same_node(self, topic_node: str, payload_node: str, leaf: str) -> bool:
        if topic_node != payload_node:
            self.counters.dropped(DropReason.WRONG_NODE)
            log.warning("node %s: %s names node %s: ignored", topic_node, leaf, payload_node)
            return False
        return True

    def _upload(self, msg: paho.MQTTMessage) -> ApiReply:
        props = user_properties(msg)
        try:
            upload_id, name, sha = props["upload_id"], props["file"], props["sha256"]
            offset = int(props["offset"])
        except (KeyError, ValueError):
            return error_reply(
                None, "bad_request", "upload needs user properties upload_id, file, offset, sha256"
            )
        try:
            ack = self.registry.upload(upload_id, name, offset, sha, bytes(msg.payload))
        except ApiFailure as exc:
            return error_reply(None, exc.code, exc.message)
        return ApiReply(request_id=None, ok=True, data=ack.model_dump(mode="json"))

    def _reply(self, msg: paho.MQTTMessage, reply: ApiReply) -> None:
        rt, corr = props_of(msg)
        if rt is None or not rt.startswith(self._replies_prefix) or any(c in rt for c in "+#"):
            log.warning(
                "api: %s without a Response Topic under %s: no reply (%s)",
                msg.topic,
                self._replies_prefix,
                reply.error.code if reply.error else "ok",
            )
            return
        self._send(rt, reply.to_json(), PublishProps(correlation_data=corr))

    def _send(self, topic: str, payload: bytes, props: PublishProps) -> None:
        self.mqtt.publish(topic, payload, qos=1, props=props)

    def _write_desired(self, d: Desired) -> None:
        desired = DesiredModel(
            rollout_id=d.rollout_id,
            model=DesiredModelRef(
                name=d.model.name, version=d.model.version, manifest_sha256=d.model.sha256
            ),
            issued_at=utcnow(),
        )

        def done(ok: bool) -> None:  # network thread
            if ok:
                self._control.put(lambda: self.orchestrator.on_confirmed(d))
            else:
                log.error("rollout %s: the broker refused desired for %s", d.rollout_id, d.node_id)

        self.mqtt.publish(
            self.topics.desired(d.node_id), desired.to_json(), qos=1, retain=True, on_done=done
        )
        log.info("rollout %s: node %s: desired %s written", d.rollout_id, d.node_id, d.model)
