"""The edge node: images in over MQTT, Results out, at least once and without loss.

This module wires the node's parts to one MQTT connection and runs its life:
- the image path (node/pipeline.py) and the update agent (node/updater.py) receive
  through the edge's routes (shared/rpc/edge.py), as does the node's own status;
- the model slot (node/slot.py) holds the model served and picks the start bundle;
- health (node/health.py): the watchdog and the recompile after device errors;
- identity (node/identity.py): a second process with the same node id;
- status and telemetry (node/status.py), published here: the retained status at
  every connect and model change (the Will says `offline`), telemetry every
  `telemetry_interval_s` (with the drift figures) from the periodic thread, which
  also compacts the journal and closes shadow windows;
- the observers of answered images (node/observers.py), on a thread of their own at
  a lower priority: drift (node/drift.py) and the shadow scorer (node/shadow.py,
  whose candidate the update agent loads on the hub's shadow order);
- the fault seam (node/faults.py) the node is built with, empty in production;
- one stop event and a shutdown bounded by `shutdown_timeout_s`: leave the shared
  subscription first (nothing more is routed to us), finish and acknowledge what we
  hold, publish `offline` (or let the broker publish the Will), disconnect.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import cv2
import openvino as ov

from cellwatch.node.classifier import Classifier
from cellwatch.node.config import NodeSettings
from cellwatch.node.decode import ImageLimits
from cellwatch.node.drift import DriftMonitor
from cellwatch.node.engine import ServingModel, check_device
from cellwatch.node.faults import Faults
from cellwatch.node.fetcher import Fetcher
from cellwatch.node.health import EXIT_DEVICE_FAILED, Health
from cellwatch.node.identity import EXIT_NODE_ID_CONFLICT, Identity
from cellwatch.node.journal import Journal
from cellwatch.node.loader import BundleLoader
from cellwatch.node.observers import Observers
from cellwatch.node.pipeline import ImagePipeline, wait_until
from cellwatch.node.samples import SampleKeeper, spool_of
from cellwatch.node.sampleupload import SampleUploader
from cellwatch.node.shadow import ShadowScorer, shadow_engine
from cellwatch.node.slot import ModelSlot, serve_start_bundle
from cellwatch.node.stats import Stats
from cellwatch.node.status import Reporter
from cellwatch.node.store import BundleStore
from cellwatch.node.updater import ShadowSetup, UpdateAgent
from cellwatch.shared.daemon import Daemon
from cellwatch.shared.mqtt import MqttClient, Will
from cellwatch.shared.rpc import Edge
from cellwatch.shared.schemas import ModelError, utcnow
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

__all__ = ["EXIT_DEVICE_FAILED", "EXIT_NODE_ID_CONFLICT", "NodeService"]

OFFLINE_RESERVE_S = 3.0
"""Part of the shutdown deadline kept for publishing `offline` and disconnecting."""
OFFLINE_RECONNECT_WAIT_S = 5.0
"""At a stop without a connection, how long to wait for paho's reconnect before
leaving `offline` to the Will (which the broker published when the connection broke)."""


class NodeService(Daemon):
    """One running node. `start()`, then `stop()` (e.g. from a signal) and `join()`;
    `exit_code` is non-zero when the node stopped itself because of a failure."""

    def __init__(
        self, settings: NodeSettings, core: ov.Core | None = None, faults: Faults | None = None
    ) -> None:
        super().__init__(settings.node_id)
        self.settings = settings
        self.node_id = node_id = settings.node_id
        self.topics = topics = Topics(settings.mqtt.topic_prefix)
        self.boot_id = uuid.uuid4().hex
        self.faults = faults if faults is not None else Faults()
        self.core = core or ov.Core()
        check_device(self.core, settings.inference.device)
        # Decode workers are the parallelism; OpenCV's own thread pool on top only
        # adds CPU (measured: 1.7 vs 1.1 ms CPU per 640x480 JPEG) that inference needs.
        cv2.setNumThreads(1)
        lim, m = settings.limits, settings.model
        self.stats = Stats(window_s=settings.telemetry_interval_s)
        self.journal = Journal(settings.resolved_state_dir(), self.faults)
        self.slot = ModelSlot(
            node_id,
            faults=self.faults,
            on_inferred=lambda *done: self.pipeline.on_inferred(*done),
            on_change=self._publish_status,
        )
        self.loader = BundleLoader(
            self.core,
            TrustedKeys.load(m.trusted_keys),
            settings.inference.engine_config(),
            allow_unsigned=m.allow_unsigned,
            self_test=m.self_test,
            faults=self.faults,
        )
        self.observers = Observers(node_id, waiting=lambda: max(0, self.stats.unanswered))
        self.drift: DriftMonitor | None = None
        if settings.drift.enabled:
            self.drift = DriftMonitor(settings.drift.window, settings.drift.min_images)
            self.observers.add(self.drift)
        image_limits = ImageLimits(lim.max_image_bytes, lim.max_image_pixels, lim.max_decoded_bytes)
        self.samples: SampleKeeper | None = None
        if settings.samples.enabled:
            self.samples = SampleKeeper(
                settings.samples,
                node_id=node_id,
                spool=spool_of(settings.samples, settings.resolved_state_dir(), node_id),
                limits=image_limits,
            )
            self.observers.add(self.samples)
        self.reporter = Reporter(
            settings,
            boot_id=self.boot_id,
            started_at=utcnow(),
            core=self.core,
            slot=self.slot,
            stats=self.stats,
            drift=self.drift,
            samples=self.samples.figures if self.samples is not None else None,
        )
        self.mqtt = MqttClient(
            settings.mqtt,
            client_id=settings.client_id,
            will=Will(topics.status(node_id), self.reporter.status(online=False).to_json()),
            clean_start=False,
            receive_maximum=lim.receive_maximum,
            manual_ack=True,
        )
        self.edge = Edge(self.mqtt)
        self.health = Health(
            node_id,
            slot=self.slot,
            on_inferred=lambda *done: self.pipeline.on_inferred(*done),
            core=self.core,
            engine=settings.inference.engine_config(),
            self_test=m.self_test,
            max_device_errors=settings.inference.max_device_errors,
            faults=self.faults,
            stopping=self._stop,
            give_up=self._give_up,
        )
        self.pipeline = ImagePipeline(
            node_id=node_id,
            topics=topics,
            classifier=Classifier(node_id, image_limits),
            stats=self.stats,
            journal=self.journal,
            faults=self.faults,
            model=self.slot.current,
            capacity=lim.max_inflight,
            start_wait_s=settings.inference.timeout_s,
            on_device_error=self.health.on_device_error,
            on_full=self.mqtt.hold_reading,
            on_room=self.mqtt.release_reading,
            observers=self.observers,
        )
        self.identity = Identity(
            node_id,
            settings.client_id,
            self.boot_id,
            reconnect_max_s=settings.mqtt.reconnect_max_s,
            backoff=self.mqtt.reconnect_backoff,
            give_up=self._give_up,
        )
        for route in self.pipeline.routes():
            self.edge.add(route)
        self.edge.add(self.identity.route(topics))
        self.mqtt.add_connect_listener(self.identity.on_connected)
        self.mqtt.add_connect_listener(lambda session_present: self._publish_status())
        self.mqtt.add_disconnect_listener(self.identity.on_disconnected)
        self.uploader: SampleUploader | None = None
        if self.samples is not None:
            self.uploader = SampleUploader(
                settings.samples,
                mqtt=self.mqtt,
                topics=topics,
                node_id=node_id,
                keeper=self.samples,
                backlog=lambda: max(0, self.stats.unanswered),
                stop=self._stop,
            )
            self.edge.add(self.uploader.route())
        self.store: BundleStore | None = None
        self.updater: UpdateAgent | None = None
        self.fetcher: Fetcher | None = None
        self.shadow: ShadowScorer | None = None
        if settings.updates.store_dir is not None:
            self._setup_updates()
        self._joined = threading.Lock()

    def _setup_updates(self) -> None:
        u = self.settings.updates
        assert u.store_dir is not None
        self.store = BundleStore(u.store_dir, keep=u.keep_versions)
        self.fetcher = Fetcher(
            self.mqtt,
            self.topics,
            self.node_id,
            window=u.fetch_window,
            chunk_bytes=u.chunk_bytes,
            timeout_s=u.chunk_timeout_s,
            stall_timeout_s=u.stall_timeout_s,
        )
        sh = self.settings.shadow
        self.shadow = ShadowScorer(
            node_id=self.node_id,
            boot_id=self.boot_id,
            publisher=self.mqtt,
            topics=self.topics,
            window_s=sh.window_s,
            max_live=sh.max_live,
        )
        self.observers.add(self.shadow, first=True)
        if self.samples is not None:
            self.shadow.on_disagreement = self.samples.on_disagreement
        self.updater = UpdateAgent(
            publisher=self.mqtt,
            topics=self.topics,
            node_id=self.node_id,
            store=self.store,
            fetcher=self.fetcher,
            loader=self.loader,
            current_sha=self._current_sha,
            activate=self.slot.activate,
            deactivate=self.slot.deactivate,
            faults=self.faults,
            shadow=ShadowSetup(
                scorer=self.shadow,
                engine=shadow_engine(self.settings.inference.engine_config(), sh.threads),
                min_free_mb=sh.min_free_mb,
                serving=self.slot.current,
            ),
        )
        for route in (*self.updater.routes(), self.fetcher.route()):
            self.edge.add(route)

    def _current_sha(self) -> str | None:
        model = self.slot.current()
        return model.bundle.manifest_sha256 if model is not None else None

    # -- model -----------------------------------------------------------------------
    @property
    def model(self) -> ServingModel | None:
        return self.slot.current()

    @property
    def model_error(self) -> ModelError | None:
        """Why the node does not serve the bundle it should (None: it does)."""
        return self.slot.error

    def load_bundle(self, path: Path) -> ServingModel:
        """Verify, compile and self-test the bundle at path, then serve it (LoadFailure
        says why it cannot be)."""
        model = self.loader.load(path)
        self.slot.activate(model)
        return model

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Serve the start bundle (node/slot.py), connect, and start the worker threads.
        Without a bundle store a start bundle that does not load is LoadFailure (one
        line, exit code 2); with one the node connects anyway and answers no_model,
        so that the hub can send it another bundle."""
        if self.slot.current() is None:
            revoked = self.updater.revoked if self.updater is not None else frozenset()
            serve_start_bundle(
                self.slot, self.loader, self.store, self.settings.model.bundle, revoked
            )
        if self.updater is not None:
            self.updater.start()
        for i in range(self.settings.limits.decode_workers):
            self._spawn(self.pipeline.worker_loop, f"decode-{i}")
        self._spawn(self._periodic_loop, "telemetry")
        self._spawn(self.health.run, "watchdog")
        if self.samples is not None:
            self.samples.start()
            self._spawn(self.samples.run, "samples")
        if self.uploader is not None:
            self._spawn(self.uploader.run, "sample-upload")
        self._spawn(self.observers.run, "observers")
        self.pipeline.accept(True)
        self.mqtt.connect()

    def _give_up(self, exit_code: int) -> None:
        """The node cannot go on (health, identity): stop with exit_code."""
        self.exit_code = exit_code
        self.stop()

    def join(self) -> None:
        """Graceful shutdown within `shutdown_timeout_s`; `offline` on every path.
        Idempotent: a second call returns at once."""
        if not self._joined.acquire(blocking=False):
            return
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self._stop.set()
        try:
            self._drain(deadline)
        except Exception:
            log.exception("node %s: shutdown step failed", self.node_id)
        finally:
            self._go_offline(deadline)
            self.journal.close()
        log.info("node %s: stopped", self.node_id)

    def _drain(self, deadline: float) -> None:
        def left(reserve: float = OFFLINE_RESERVE_S) -> float:
            return max(0.1, deadline - reserve - time.monotonic())

        # 1. Leave the shared subscriptions: the broker routes no more images to us and
        # nothing is stranded in our session (images it had already sent arrive before
        # its UNSUBACK and are answered below).
        shared = self.pipeline.shared_subscriptions()
        if not self.mqtt.unsubscribe(*shared, timeout=min(5, left())):
            log.warning("node %s: could not leave the shared subscriptions", self.node_id)
        # Images for our direct topics from now on wait in our session for the next start.
        self.pipeline.accept(False)
        if self.updater is not None:
            self.updater.stop(timeout=min(10.0, left()))
        log.info(
            "node %s: stopping, finishing %d in-flight images", self.node_id, self.stats.inflight
        )
        # 2. Finish and acknowledge what we hold (the watchdog answers a stuck device).
        wait_until(lambda: self.stats.inflight <= 0, time.monotonic() + left())
        handed_back = self.pipeline.close()
        self.observers.close()
        if self.samples is not None:
            self.samples.close()
            self.samples.written.set()  # the uploader sees the stop
        if self.shadow is not None:
            self.shadow.flush(force=True)  # its last window; the phase resumes at a restart
        self.health.stop()
        for thread in self._threads:
            thread.join(timeout=left(reserve=OFFLINE_RESERVE_S / 2))
        if self.uploader is not None:
            self.uploader.close()
        if self.stats.inflight > 0:
            log.warning(
                "node %s: %d images unanswered at shutdown (%d never started); the broker "
                "delivers them again",
                self.node_id,
                self.stats.inflight,
                handed_back,
            )

    def _go_offline(self, deadline: float) -> None:
        """Publish `offline`; if that cannot be done, close the socket without DISCONNECT
        so the broker publishes our Will (which says the same)."""
        if self.mqtt.closed:
            return  # closed before (a failed start, a test's drop): the Will said it
        wait = max(1.0, deadline - time.monotonic())
        if not self.mqtt.wait_connected(min(wait, OFFLINE_RECONNECT_WAIT_S)):
            log.warning("node %s: not connected: the broker publishes our Will", self.node_id)
            self.mqtt.drop()
            return
        offline = self.reporter.status(online=False).to_json()
        if self.mqtt.publish_wait(
            self.topics.status(self.node_id), offline, qos=1, retain=True, timeout=wait
        ):
            self.mqtt.disconnect()
        else:
            log.warning("node %s: offline not confirmed: leaving it to the Will", self.node_id)
            self.mqtt.drop()

    def abort(self) -> None:
        self.health.stop()
        self.journal.close()
        super().abort()

    # -- status and telemetry --------------------------------------------------------
    def _publish_status(self) -> None:
        """The retained `online` status (at every connect and model change); while
        not connected the next connect publishes it, and a stop publishes `offline`."""
        if self._stop.is_set() or not self.mqtt.connected:
            return
        self.mqtt.publish(
            self.topics.status(self.node_id),
            self.reporter.status(online=True).to_json(),
            qos=1,
            retain=True,
        )

    def _periodic_loop(self) -> None:
        while not self._stop.wait(self.settings.telemetry_interval_s):
            try:
                self.mqtt.publish(
                    self.topics.telemetry(self.node_id),
                    self.reporter.telemetry().to_json(),
                    qos=0,
                )
                if self.shadow is not None:
                    self.shadow.flush()
                self.journal.compact()
                if self.samples is not None:
                    self.samples.spool.expire(time.time())
            except Exception:  # a telemetry hiccup must not end the thread
                log.exception("node %s: telemetry failed", self.node_id)
