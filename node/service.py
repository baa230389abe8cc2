"""The edge node: images in over MQTT, Results out, at least once and without loss.

The image path itself is node/pipeline.py. This module wires it to MQTT and runs
what is around it:
- the model: load at start, swap on an update (node/updater.py), recompile after
  `max_device_errors` consecutive device errors, or exit (non-zero, for systemd to
  restart the node) when even that fails;
- the watchdog thread: answers inferences the device never finished (`device_error`),
  frees retired models once their last request ended, and recompiles;
- status (retained, Will `offline`) and telemetry;
- a second process with the same node id: each connection takes the session from
  the other. We notice it by an `online` status of our node id with another boot_id
  (we read our own retained status; Mosquitto 2.0.11 closes a taken-over connection
  without the DISCONNECT 0x8E that newer brokers send, which we notice too), back off
  instead of fighting, and exit non-zero after repeated takeovers;
- one stop event and a shutdown bounded by `shutdown_timeout_s`: leave the shared
  subscription first (nothing more is routed to us), finish and acknowledge what we
  hold, publish `offline` (or let the broker publish the Will), disconnect.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path

import cv2
import openvino as ov
import paho.mqtt.client as paho
from pydantic import ValidationError

from cellwatch.node.classifier import Classifier
from cellwatch.node.config import NodeSettings
from cellwatch.node.decode import ImageLimits
from cellwatch.node.engine import ServingModel, available_devices, check_device, load_serving_model
from cellwatch.node.errors import ModelLoadError
from cellwatch.node.faults import Faults
from cellwatch.node.fetcher import Fetcher
from cellwatch.node.journal import Journal
from cellwatch.node.loader import BundleLoader, Candidate
from cellwatch.node.pipeline import ImagePipeline, wait_until
from cellwatch.node.stats import Stats
from cellwatch.node.store import BundleStore
from cellwatch.node.updater import UpdateAgent
from cellwatch.shared.codes import ModelErrorCode
from cellwatch.shared.daemon import Daemon
from cellwatch.shared.mqtt import SESSION_TAKEN_OVER, MessageHandler, MqttClient, Will
from cellwatch.shared.schemas import ModelError, NodeStatus, Telemetry, utcnow
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 0.25
TAKEOVERS_BEFORE_EXIT = 3
"""Session takeovers (another process with our client id) within TAKEOVER_WINDOW_S
after which the node gives up and exits non-zero."""
TAKEOVER_WINDOW_S = 600.0
TAKEOVER_BACKOFF_MAX_S = 300.0
"""After the k-th takeover the node waits reconnect_max_s x 2^(k-1) (at most this)
before it connects again: the other process keeps the connection meanwhile, instead of
the two taking it from each other every second."""
OFFLINE_RESERVE_S = 3.0
"""Part of the shutdown deadline kept for publishing `offline` and disconnecting."""
OFFLINE_RECONNECT_WAIT_S = 5.0
"""At a stop without a connection, how long to wait for paho's reconnect before
leaving `offline` to the Will (which the broker published when the connection broke)."""
EXIT_DEVICE_FAILED = 3
EXIT_NODE_ID_CONFLICT = 4


def software_versions() -> dict[str, str]:
    versions = {}
    for dist in ("cellwatch", "openvino", "paho-mqtt", "opencv-python-headless"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


class NodeService(Daemon):
    """One running node. `start()`, then `stop()` (e.g. from a signal) and `join()`;
    `exit_code` is non-zero when the node stopped itself because of a failure."""

    def __init__(
        self, settings: NodeSettings, core: ov.Core | None = None, faults: Faults | None = None
    ) -> None:
        super().__init__(settings.node_id)
        self.settings = settings
        self.node_id = settings.node_id
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.boot_id = uuid.uuid4().hex
        self.started_at = utcnow()
        self.exit_code = 0
        self.faults = faults if faults is not None else Faults.from_env()
        self.core = core or ov.Core()
        check_device(self.core, settings.inference.device)
        # Decode workers are the parallelism; OpenCV's own thread pool on top only
        # adds CPU (measured: 1.7 vs 1.1 ms CPU per 640x480 JPEG) that inference needs.
        cv2.setNumThreads(1)
        self.trusted = TrustedKeys.load(settings.model.trusted_keys)
        lim = settings.limits
        self.classifier = Classifier(
            self.node_id,
            ImageLimits(lim.max_image_bytes, lim.max_image_pixels, lim.max_decoded_bytes),
        )
        self.stats = Stats(window_s=settings.telemetry_interval_s)
        self.journal = Journal(settings.resolved_state_dir())
        self._model: ServingModel | None = None
        self._model_error: ModelError | None = None
        self._served_before = False
        m = settings.model
        self.loader = BundleLoader(
            self.core,
            self.trusted,
            settings.inference.engine_config(),
            allow_unsigned=m.allow_unsigned,
            self_test=m.self_test,
            faults=self.faults,
        )
        self._model_lock = threading.Lock()
        self._retired: list[ServingModel] = []
        self._recompile = threading.Event()
        self._watchdog_stop = threading.Event()
        self._joined = False
        self._takeovers: list[float] = []
        self._conflict_generation = -1
        self.mqtt = MqttClient(
            settings.mqtt,
            client_id=settings.client_id,
            will=Will(self.topics.status(self.node_id), self._status("offline").to_json()),
            clean_start=False,
            receive_maximum=lim.receive_maximum,
            manual_ack=True,
            subscriptions=[
                (self.topics.images_shared_filter(), 1),
                (self.topics.node_images(self.node_id), 1),
            ],
        )
        self.pipeline = ImagePipeline(
            node_id=self.node_id,
            mqtt=self.mqtt,
            topics=self.topics,
            classifier=self.classifier,
            stats=self.stats,
            journal=self.journal,
            faults=self.faults,
            model=lambda: self._model,
            capacity=lim.max_inflight,
            put_wait_s=min(5.0, settings.mqtt.keepalive_s / 4),
            start_wait_s=settings.inference.timeout_s,
            on_device_error=self._on_device_error,
        )
        self.mqtt.route(self.topics.images_filter(), self.pipeline.on_message)
        self.mqtt.route(self.topics.node_images(self.node_id), self.pipeline.on_message)
        self.mqtt.route(self.topics.status(self.node_id), self._acked(self._on_own_status))
        self.mqtt.subscribe(self.topics.status(self.node_id), 1)
        self.mqtt.add_connect_listener(self._on_connected)
        self.mqtt.add_disconnect_listener(self._on_disconnected)
        self.store: BundleStore | None = None
        self.updater: UpdateAgent | None = None
        self.fetcher: Fetcher | None = None
        if settings.updates.store_dir is not None:
            self._setup_updates()

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
        self.updater = UpdateAgent(
            mqtt=self.mqtt,
            topics=self.topics,
            node_id=self.node_id,
            store=self.store,
            fetcher=self.fetcher,
            loader=self.loader,
            current_sha=self._current_sha,
            activate=self.activate,
            deactivate=self.deactivate,
            faults=self.faults,
        )
        desired, fetch = self.topics.desired(self.node_id), self.topics.fetch_reply(self.node_id)
        revoked = self.topics.hub_revoked()
        self.mqtt.route(desired, self._acked(self.updater.on_desired))
        self.mqtt.route(fetch, self._acked(self.fetcher.on_reply))
        self.mqtt.route(revoked, self._acked(self.updater.on_revoked))
        self.mqtt.subscribe(desired, 1)
        self.mqtt.subscribe(fetch, 1)
        self.mqtt.subscribe(revoked, 1)

    def _start_candidates(self) -> list[Candidate]:
        out: list[Candidate] = []
        if self.store is not None:
            active = self.store.active()
            if active is not None:
                out.append(Candidate(self.store.path(active), active))
            out += [Candidate(self.store.path(s), s) for s in self.store.previous()]
        if self.settings.model.bundle is not None:
            out.append(Candidate(self.settings.model.bundle))
        return out

    def _load_start_model(self) -> None:
        candidates = self._start_candidates()
        if not candidates:
            log.warning("node %s: no bundle configured; answering no_model", self.node_id)
            return
        revoked = self.updater.revoked if self.updater is not None else frozenset()
        model, chosen, failures = self.loader.first_good(candidates, revoked)
        error = None
        if failures:
            first, why = failures[0]
            serving = f"; serving {model.bundle} instead" if model else "; answering no_model"
            error = ModelError(code=why.code, message=f"{first.label()}: {why}{serving}"[:2048])
            for c, failure in failures:
                if failure.code is ModelErrorCode.HASH_MISMATCH and c.sha and self.store:
                    self.store.discard(c.sha)  # damaged: the next desired fetches it again
        if model is None or chosen is None:
            assert error is not None
            if self.store is None:
                # Without a bundle store the hub cannot send another bundle: a clear
                # error now (exit code 2) helps more than a node answering no_model.
                raise failures[0][1]
            self.deactivate(error)
            return
        self.activate(model, error)
        if self.store is not None:
            sha = model.bundle.manifest_sha256
            try:
                if chosen.sha is None:  # the configured bundle: keep a copy for rollbacks
                    self.store.import_dir(sha, chosen.path)
                if self.store.active() != sha:
                    self.store.set_active(sha)
            except OSError as exc:  # e.g. a full disk: it serves anyway
                log.error("node %s: cannot record %s in the store: %s", self.node_id, sha[:12], exc)

    def _acked(self, handler: MessageHandler) -> MessageHandler:
        """handler, then acknowledge the message (the handler only hands it over)."""

        def handle(msg: paho.MQTTMessage) -> None:
            try:
                handler(msg)
            finally:
                self.mqtt.ack_token(msg)()

        return handle

    def _current_sha(self) -> str | None:
        model = self._model
        return model.bundle.manifest_sha256 if model is not None else None

    # -- model -----------------------------------------------------------------------
    @property
    def model(self) -> ServingModel | None:
        return self._model

    @property
    def model_error(self) -> ModelError | None:
        """Why the node does not serve the bundle it should (None: it does)."""
        return self._model_error

    def load_bundle(self, path: Path) -> ServingModel:
        """Verify, compile and self-test the bundle at path, then serve it (LoadFailure
        says why it cannot be)."""
        model = self.loader.load(path)
        self.activate(model)
        return model

    def activate(self, model: ServingModel, error: ModelError | None = None) -> None:
        """Serve model from now on; requests already started finish on the old one.
        error: what the status says of it (e.g. a fallback: why not the active one)."""
        if self.faults.any and self._model is None and not self._served_before:
            model.inject(self.faults)
        self._served_before = True
        model.set_callback(self.pipeline.on_inferred)
        self._swap(model, error)
        log.info("node %s: now serving %s", self.node_id, model.bundle)

    def deactivate(self, error: ModelError) -> None:
        """Serve no model (answer no_model) from now on, and say why."""
        self._swap(None, error)
        log.error("node %s: serving no model: %s", self.node_id, error.message)

    def _swap(self, model: ServingModel | None, error: ModelError | None) -> None:
        with self._model_lock:
            old, self._model = self._model, model
            self._model_error = error
            if old is not None:
                old.retire()
                self._retired.append(old)
        if self.mqtt.connected:  # otherwise the connect publishes it (with this model)
            self._publish_status()

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Load the start bundle, connect, and start the worker threads.

        With a bundle store, the bundle active before a restart wins over the
        configured one; the configured one is copied into the store so that a
        rollback to it needs no download. When the active bundle does not load (its
        signer's key was removed, a damaged file, an OpenVINO that cannot compile it)
        or was revoked, the earlier ones in the store are tried, newest first, then
        the configured one; when none loads, the node connects anyway and answers
        no_model, so that the hub can send it another bundle. Either way its status
        says why (`model_error`). A node without a bundle store, which the hub cannot
        help, refuses to start instead (LoadFailure: one line, exit code 2).
        """
        if self._model is None:
            self._load_start_model()
        if self.updater is not None:
            self.updater.start()
        for i in range(self.settings.limits.decode_workers):
            self._spawn(self.pipeline.worker_loop, f"decode-{i}")
        self._spawn(self._telemetry_loop, "telemetry")
        self._spawn(self._watchdog_loop, "watchdog")
        self.pipeline.accept(True)
        self.mqtt.connect()

    def join(self) -> None:
        """Graceful shutdown within `shutdown_timeout_s`; `offline` on every path.
        Idempotent: a second call returns at once."""
        with self._model_lock:
            if self._joined:
                return
            self._joined = True
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

        # 1. Leave the shared subscription: the broker routes no more images to us and
        # nothing is stranded in our session (images it had already sent arrive before
        # its UNSUBACK and are answered below).
        if not self.mqtt.unsubscribe(self.topics.images_shared_filter(), timeout=min(5, left())):
            log.warning("node %s: could not leave the shared subscription", self.node_id)
        # Images for our direct topic from now on wait in our session for the next start.
        self.pipeline.accept(False)
        if self.updater is not None:
            self.updater.stop(timeout=min(10.0, left()))
        log.info(
            "node %s: stopping, finishing %d in-flight images", self.node_id, self.stats.inflight
        )
        # 2. Finish and acknowledge what we hold (the watchdog answers a stuck device).
        wait_until(lambda: self.stats.inflight <= 0, time.monotonic() + left())
        handed_back = self.pipeline.close()
        self._watchdog_stop.set()
        for thread in self._threads:
            thread.join(timeout=left(reserve=OFFLINE_RESERVE_S / 2))
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
        offline = self._status("offline").to_json()
        if self.mqtt.publish_wait(
            self.topics.status(self.node_id), offline, qos=1, retain=True, timeout=wait
        ):
            self.mqtt.disconnect()
        else:
            log.warning("node %s: offline not confirmed: leaving it to the Will", self.node_id)
            self.mqtt.drop()

    def abort(self) -> None:
        self._watchdog_stop.set()
        self.journal.close()
        super().abort()

    # -- device errors and the watchdog ---------------------------------------------
    def _on_device_error(self, consecutive: int) -> None:
        if consecutive >= self.settings.inference.max_device_errors:
            self._recompile.set()

    def _watchdog_loop(self) -> None:
        """Runs until the very end of a shutdown: the drain may need it."""
        while not self._watchdog_stop.wait(WATCHDOG_PERIOD_S):
            try:
                self._watch()
            except Exception:  # the watchdog must outlive anything it sees
                log.exception("node %s: watchdog step failed", self.node_id)

    def _watch(self) -> None:
        now = time.monotonic()
        with self._model_lock:
            models = [m for m in (self._model, *self._retired) if m is not None]
            # A retired model with nothing in flight is dropped: nothing else refers to it.
            self._retired = [m for m in self._retired if m.pending > 0]
        for model in models:
            for req in model.expired(now):
                self.pipeline.on_inferred(
                    model,
                    None,
                    req,
                    TimeoutError(f"no answer within {model.config.infer_timeout_s:g} s"),
                )
        if self._recompile.is_set() and not self._stop.is_set():
            self._recompile.clear()
            self._recover()

    def _recover(self) -> None:
        """Recompile the current model after repeated device errors; exit if that fails."""
        model = self._model
        if model is None:
            return
        log.error(
            "node %s: %d consecutive device errors on %s: recompiling %s",
            self.node_id,
            self.settings.inference.max_device_errors,
            model.config.device,
            model.bundle,
        )
        try:
            if self.faults.recompile_fails:
                raise ModelLoadError("test fault: recompiling fails")
            fresh = load_serving_model(
                self.core,
                model.bundle,
                self.settings.inference.engine_config(),
                self_test=self.settings.model.self_test,
            )
        except (ModelLoadError, RuntimeError) as exc:
            log.error(
                "node %s: the device did not recover (%s): going offline and exiting with "
                "code %d so that systemd restarts the node",
                self.node_id,
                exc,
                EXIT_DEVICE_FAILED,
            )
            self.exit_code = EXIT_DEVICE_FAILED
            self.stop()
            return
        self.activate(fresh)

    # -- a second process with our node id -------------------------------------------
    def _on_disconnected(self, reason: object) -> None:
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self._taken_over("the broker said: Session taken over")

    def _on_own_status(self, msg: paho.MQTTMessage) -> None:
        """The retained status the broker replays when we (re)subscribe is the node's
        current state: `online` from another boot means another process holds our node
        id. Live copies are history (a resumed session may hold our predecessor's)."""
        if not msg.payload or not msg.retain:
            return
        try:
            status = NodeStatus.model_validate_json(msg.payload)
        except ValidationError:
            return
        if status.boot_id != self.boot_id and status.state == "online":
            self._taken_over(f"process {status.boot_id[:8]} says it is node {self.node_id}")

    def _taken_over(self, evidence: str) -> None:
        """Network thread: count session takeovers (once per connection), back off,
        give up after a few."""
        if self._conflict_generation == self.mqtt.generation:
            return
        self._conflict_generation = self.mqtt.generation
        now = time.monotonic()
        self._takeovers = [t for t in self._takeovers if now - t < TAKEOVER_WINDOW_S] + [now]
        count = len(self._takeovers)
        if count >= TAKEOVERS_BEFORE_EXIT:
            log.error(
                "node %s: session taken over %d times in %.0f s: another process runs with "
                "node id %s (client id %s). Exiting with code %d; stop the duplicate.",
                self.node_id,
                count,
                TAKEOVER_WINDOW_S,
                self.node_id,
                self.settings.client_id,
                EXIT_NODE_ID_CONFLICT,
            )
            self.exit_code = EXIT_NODE_ID_CONFLICT
            self.stop()
            return
        backoff = min(TAKEOVER_BACKOFF_MAX_S, self.settings.mqtt.reconnect_max_s * 2 ** (count - 1))
        log.error(
            "node %s: another process connected with our client id %s and took our session "
            "(%s; %d of %d); reconnecting after %.0f s instead of taking it back at once",
            self.node_id,
            self.settings.client_id,
            evidence,
            count,
            TAKEOVERS_BEFORE_EXIT,
            backoff,
        )
        self.mqtt.reconnect_backoff(backoff, max(backoff, self.settings.mqtt.reconnect_max_s))

    # -- status and telemetry --------------------------------------------------------
    def _status(self, state: str) -> NodeStatus:
        model = self._model
        return NodeStatus(
            node_id=self.node_id,
            state="online" if state == "online" else "offline",
            boot_id=self.boot_id,
            since=self.started_at,
            model=model.bundle.ref if model is not None else None,
            model_error=self._model_error,
            device=self.settings.inference.device,
            devices_available=available_devices(self.core),
            tags=list(self.settings.tags),
            software=software_versions(),
            model_flags=model.flags if model is not None else [],
        )

    def _publish_status(self) -> None:
        if self._stop.is_set():
            return  # the shutdown publishes `offline` itself
        self.mqtt.publish(
            self.topics.status(self.node_id), self._status("online").to_json(), qos=1, retain=True
        )

    def _on_connected(self, session_present: bool) -> None:
        self._publish_status()

    def telemetry(self) -> Telemetry:
        processed, errors, inflight, ips, latency = self.stats.snapshot()
        model = self._model
        return Telemetry(
            node_id=self.node_id,
            ts=utcnow(),
            window_s=self.stats.window_s,
            processed=processed,
            errors=errors,
            errors_by_code=self.stats.errors_by_code(),
            throughput_ips=round(ips, 3),
            latency_ms=latency,
            inflight=max(0, inflight),
            model_version=model.bundle.manifest.version if model is not None else None,
            rss_mb=round(self.stats.rss_mb(), 1),
        )

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.settings.telemetry_interval_s):
            try:
                self.mqtt.publish(
                    self.topics.telemetry(self.node_id), self.telemetry().to_json(), qos=0
                )
                self.journal.compact()
            except Exception:  # a telemetry hiccup must not end the thread
                log.exception("node %s: telemetry failed", self.node_id)
