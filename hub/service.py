"""The hub daemon: wiring, threads and the one stop event.

Threads: paho's network thread runs the hub's routes (hub/intake.py, hub/fetch.py on
shared/rpc/edge.py), which check each message and hand it over without ever waiting
(shared/handoff.py), and so do the broker's acknowledgements of the desired models
the hub writes; `fetch-N` workers serve bundle chunks; the `control` thread
(hub/control.py) does everything that changes state, in order, and ticks the rollout
engine. A message is acknowledged to the broker only after it was handled. The hub's
Receive Maximum (`limits.receive_maximum`) bounds the messages the broker hands it
unacknowledged. With `[http] enabled`, the `hub-http` thread serves the read-only
fleet page, /api and /metrics (hub/web/): it reads the database through its own
connection and the thread-safe snapshots below, never a lock the network or control
thread waits on.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cellwatch.hub.api import Api
from cellwatch.hub.config import HubSettings
from cellwatch.hub.control import Control
from cellwatch.hub.counters import HubCounters
from cellwatch.hub.db import Database
from cellwatch.hub.errors import HubError
from cellwatch.hub.fetch import FetchServer
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.intake import Confirmed, Intake, Item
from cellwatch.hub.orchestrator import Orchestrator
from cellwatch.hub.registry import Registry
from cellwatch.hub.samples import DAY_S, SampleStore
from cellwatch.hub.served import ServedTotals
from cellwatch.hub.sites import Sites
from cellwatch.hub.store import BundleStore
from cellwatch.hub.targets import Desired, ShadowWrite
from cellwatch.shared.daemon import Daemon
from cellwatch.shared.errors import MqttError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.limits import MiB
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.rpc import Edge
from cellwatch.shared.schemas import DesiredModel, ShadowOrder
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

if TYPE_CHECKING:
    from cellwatch.hub.web.server import HttpServer

log = logging.getLogger(__name__)


class HubService(Daemon):
    """One hub. `start()`, then `stop()` (e.g. from a signal) and `join()`."""

    def __init__(self, settings: HubSettings) -> None:
        super().__init__("hub")
        self.settings = settings
        self.topics = t = Topics(settings.mqtt.topic_prefix)
        self.db = Database(settings.db_path)
        self.store = BundleStore(settings.store_dir)
        trusted = TrustedKeys.load(settings.trusted_keys)
        if not trusted.keys and not settings.allow_unsigned:
            log.warning("hub: no trusted keys configured: every push will be refused")
        self.registry = Registry(
            self.db, self.store, trusted, allow_unsigned=settings.allow_unsigned
        )
        self.counters = HubCounters()
        self.sites = Sites()
        self.fleet = Fleet(self.db, max_nodes=settings.limits.max_nodes, sites=self.sites)
        self.mqtt = MqttClient(
            settings.mqtt,
            client_id=settings.client_id,
            clean_start=False,
            receive_maximum=settings.limits.receive_maximum,
            manual_ack=True,
        )
        self.fetch = FetchServer(self.store, t, settings.max_chunk_bytes, self.counters)
        self.served = ServedTotals(self.fetch, self.db)
        self.orchestrator = Orchestrator(
            self.db,
            self.fleet,
            self.registry,
            settings.rollout,
            self._write_desired,
            self._publish_revocations,
            write_shadow=self._write_shadow,
        )
        sm = settings.samples
        self.samples = SampleStore(
            self.db, settings.samples_dir, int(sm.quota_mb * MiB), sm.retention_days * DAY_S
        )
        self.samples.expire(time.time())
        self.api = Api(
            self.db, self.registry, self.fleet, self.orchestrator, self.served, self.samples
        )
        self._control: Handoff[Item] = Handoff(name="hub: control")
        self.control = Control(
            topics=t,
            db=self.db,
            fleet=self.fleet,
            registry=self.registry,
            orchestrator=self.orchestrator,
            api=self.api,
            served=self.served,
            counters=self.counters,
            queue=self._control,
            tick_s=settings.tick_s,
            stop=self._stop,
        )
        self.intake = Intake(t, settings.limits, self.counters, self._control, self.control)
        self.control.intake = self.intake
        self.edge = Edge(self.mqtt)
        for route in (*self.intake.routes(), self.fetch.route()):
            self.edge.add(route)
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
        self._spawn(self.control.run, "control")
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
        # After the retained revocation list the broker sent us on subscribing (queued
        # before the marker's acknowledgement): what an earlier hub revoked is learnt
        # first, then published with ours (hub/intake.py).
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
            sites=self.sites,
            db_commits=lambda: self.db.commits,
        )
        self.http = HttpServer(self.settings.http, sources)
        self.http.start()

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()

    def _stop_threads(self) -> None:
        self._stop.set()
        self._control.put(None)
        self.fetch.queue.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    def _fetch_loop(self) -> None:
        while (inbound := self.fetch.queue.get()) is not None:
            try:
                self.fetch.serve(inbound)
            except Exception:  # keep serving whatever one request did
                log.exception("fetch: request on %s failed", inbound.topic)

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

    def _write_shadow(self, w: ShadowWrite) -> None:
        """A node's retained shadow order (load the candidate, or stop)."""
        order = ShadowOrder(
            rollout_id=w.rollout_id,
            model=w.model,
            rate=w.rate,
            issued_at=datetime.fromtimestamp(w.issued_at, UTC),
        )
        self.mqtt.publish(self.topics.shadow(w.node_id), order.to_json(), qos=1, retain=True)
        log.info(
            "rollout %s: node %s: shadow %s",
            w.rollout_id,
            w.node_id,
            f"{w.model} at {w.rate:.0%}" if w.model else "stop",
        )
