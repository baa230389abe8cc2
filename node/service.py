"""The edge node: images in over MQTT, Results out, at least once and without loss.

Threads and their jobs (STYLE.md, "Threads"):
- paho's network thread only parses each message and enqueues it (bounded queue);
- `decode_workers` threads decode and preprocess, then start inference on the
  model's OpenVINO AsyncInferQueue (blocking there when every request is busy);
- OpenVINO's completion callback builds the Result and publishes it; when the broker
  acknowledges the Result, the image is acknowledged (paho manual_ack), so an image
  is only ever dropped by the broker after its answer is safe;
- a telemetry thread publishes Telemetry every `telemetry_interval_s`;
- one stop event drives an ordered shutdown: stop accepting, finish and publish what
  is in flight, publish `offline`, disconnect.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openvino as ov
import paho.mqtt.client as paho

from cellwatch.node.classifier import Classifier
from cellwatch.node.config import NodeSettings
from cellwatch.node.decode import ImageError, ImageLimits
from cellwatch.node.engine import ServingModel, available_devices, check_device, load_serving_model
from cellwatch.node.fetcher import Fetcher
from cellwatch.node.requests import ImageRequest, parse_message
from cellwatch.node.stats import Stats
from cellwatch.node.store import BundleStore
from cellwatch.node.updater import UpdateAgent
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.daemon import Daemon
from cellwatch.shared.errors import MqttError
from cellwatch.shared.mqtt import MqttClient, PublishProps, Will
from cellwatch.shared.schemas import ErrorCode, NodeStatus, Result, Telemetry, utcnow
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

SHUTDOWN_DRAIN_S = 60.0
"""How long a graceful stop waits for in-flight images before giving up on them."""


def software_versions() -> dict[str, str]:
    versions = {}
    for dist in ("cellwatch", "openvino", "paho-mqtt", "opencv-python-headless"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


class NodeService(Daemon):
    """One running node. `start()`, then `stop()` (e.g. from a signal) and `join()`."""

    def __init__(self, settings: NodeSettings, core: ov.Core | None = None) -> None:
        super().__init__(settings.node_id)
        self.settings = settings
        self.node_id = settings.node_id
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.boot_id = uuid.uuid4().hex
        self.started_at = utcnow()
        self.core = core or ov.Core()
        check_device(self.core, settings.inference.device)
        # Decode workers are the parallelism; OpenCV's own thread pool on top only
        # adds CPU (measured: 1.7 vs 1.1 ms CPU per 640x480 JPEG) that inference needs.
        cv2.setNumThreads(1)
        self.trusted = TrustedKeys.load(settings.model.trusted_keys)
        lim = settings.limits
        self.classifier = Classifier(
            self.node_id, ImageLimits(lim.max_image_bytes, lim.max_image_pixels)
        )
        self.stats = Stats(window_s=settings.telemetry_interval_s)
        self._model: ServingModel | None = None
        self._work: queue.Queue[ImageRequest | None] = queue.Queue(maxsize=lim.max_inflight)
        self._accepting = threading.Event()
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
        self.mqtt.set_message_handler(self._on_message)
        self.mqtt.add_connect_listener(self._on_connected)
        self.store: BundleStore | None = None
        self.updater: UpdateAgent | None = None
        self.fetcher: Fetcher | None = None
        if settings.updates.store_dir is not None:
            self._setup_updates()

    def _setup_updates(self) -> None:
        u, m = self.settings.updates, self.settings.model
        assert u.store_dir is not None
        self.store = BundleStore(u.store_dir, keep=u.keep_versions)
        self.fetcher = Fetcher(
            self.mqtt,
            self.topics,
            self.node_id,
            window=u.fetch_window,
            chunk_bytes=u.chunk_bytes,
            timeout_s=u.chunk_timeout_s,
        )
        self.updater = UpdateAgent(
            mqtt=self.mqtt,
            topics=self.topics,
            node_id=self.node_id,
            store=self.store,
            fetcher=self.fetcher,
            trusted=self.trusted,
            allow_unsigned=m.allow_unsigned,
            core=self.core,
            engine=self.settings.inference.engine_config(),
            self_test=m.self_test,
            current_sha=self._current_sha,
            activate=self.activate,
        )
        self._desired_topic = self.topics.desired(self.node_id)
        self._fetch_topic = self.topics.fetch_reply(self.node_id)
        self.mqtt.subscribe(self._desired_topic, 1)
        self.mqtt.subscribe(self._fetch_topic, 1)

    def _current_sha(self) -> str | None:
        model = self._model
        return model.bundle.manifest_sha256 if model is not None else None

    # -- model -----------------------------------------------------------------
    @property
    def model(self) -> ServingModel | None:
        return self._model

    def load_bundle(self, path: Path) -> ServingModel:
        """Verify, compile and self-test the bundle at path, then serve it."""
        m = self.settings.model
        bundle = load_bundle(path, self.trusted, allow_unsigned=m.allow_unsigned)
        model = load_serving_model(
            self.core, bundle, self.settings.inference.engine_config(), self_test=m.self_test
        )
        self.activate(model)
        return model

    def activate(self, model: ServingModel) -> None:
        """Serve model from now on; requests already started finish on the old one."""
        model.set_callback(self._on_inferred)
        self._model = model
        log.info("node %s: now serving %s", self.node_id, model.bundle)
        if self.mqtt.connected:
            self._publish_status()

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Load the start bundle, connect, and start the worker threads.

        With a bundle store, the bundle active before a restart wins over the
        configured one; the configured one is copied into the store so that a
        rollback to it needs no download.
        """
        active = self.store.active() if self.store is not None else None
        if active is not None and self._model is None:
            assert self.store is not None
            self.load_bundle(self.store.path(active))
        elif self.settings.model.bundle is not None and self._model is None:
            model = self.load_bundle(self.settings.model.bundle)
            if self.store is not None:
                sha = model.bundle.manifest_sha256
                self.store.import_dir(sha, self.settings.model.bundle)
                self.store.set_active(sha)
        elif self._model is None:
            log.warning("node %s: no bundle configured; answering no_model", self.node_id)
        if self.updater is not None:
            self.updater.start()
        for i in range(self.settings.limits.decode_workers):
            self._spawn(self._worker_loop, f"decode-{i}")
        self._spawn(self._telemetry_loop, "telemetry")
        self._accepting.set()
        self.mqtt.connect()

    def join(self) -> None:
        """Graceful shutdown: finish in-flight images, publish offline, disconnect."""
        self._stop.set()
        self._accepting.clear()
        if self.updater is not None:
            self.updater.stop()
        log.info(
            "node %s: stopping, finishing %d in-flight images", self.node_id, self.stats.inflight
        )
        for _ in range(self.settings.limits.decode_workers):
            self._work.put(None)
        for t in self._threads:
            t.join(timeout=SHUTDOWN_DRAIN_S)
        self._abandon_queued()
        if self._model is not None:
            self._model.wait_all()
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while self.stats.inflight > 0 and time.monotonic() < deadline and self.mqtt.connected:
            time.sleep(0.01)
        if self.stats.inflight:
            log.warning(
                "node %s: %d images unanswered at shutdown (the broker will redeliver)",
                self.node_id,
                self.stats.inflight,
            )
        if self.mqtt.connected:
            self.mqtt.publish_wait(
                self.topics.status(self.node_id),
                self._status("offline").to_json(),
                qos=1,
                retain=True,
            )
        self.mqtt.disconnect()
        log.info("node %s: stopped", self.node_id)

    def _abandon_queued(self) -> None:
        """Images still queued after the workers stopped: not acked, so the broker
        redelivers them to this node's next session."""
        while True:
            try:
                req = self._work.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                self.stats.abandoned()

    # -- status and telemetry -------------------------------------------------------
    def _status(self, state: str) -> NodeStatus:
        model = self._model
        return NodeStatus(
            node_id=self.node_id,
            state="online" if state == "online" else "offline",
            boot_id=self.boot_id,
            since=self.started_at,
            model=model.bundle.ref if model is not None else None,
            device=self.settings.inference.device,
            devices_available=available_devices(self.core),
            tags=list(self.settings.tags),
            software=software_versions(),
            model_flags=model.flags if model is not None else [],
        )

    def _publish_status(self) -> None:
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
            throughput_ips=round(ips, 3),
            latency_ms=latency,
            inflight=max(0, inflight),
            model_version=model.bundle.manifest.version if model is not None else None,
            rss_mb=round(self.stats.rss_mb(), 1),
        )

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.settings.telemetry_interval_s):
            if self.mqtt.connected:
                self.mqtt.publish(
                    self.topics.telemetry(self.node_id), self.telemetry().to_json(), qos=0
                )

    # -- the image path ----------------------------------------------------------------
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        """Network thread: parse and enqueue (bounded), nothing else."""
        if self.updater is not None and self.fetcher is not None:
            if msg.topic == self._fetch_topic:
                self.fetcher.on_reply(msg)
                self.mqtt.ack(msg.mid, msg.qos, self.mqtt.generation)
                return
            if msg.topic == self._desired_topic:
                self.updater.on_desired(msg)
                self.mqtt.ack(msg.mid, msg.qos, self.mqtt.generation)
                return
        if not self._accepting.is_set():
            return  # not acked: the broker redelivers it to our next session
        req = parse_message(msg, self.topics, self.node_id, self.mqtt.generation)
        self.stats.started()
        # Blocks while the queue is full: paho stops reading the socket, so TCP pushes
        # back on the broker. Receive Maximum alone is not enough (Mosquitto 2.0 sends
        # more than it once acks start flowing); workers free the queue without needing
        # this thread, so this cannot deadlock.
        self._work.put(req)

    def _worker_loop(self) -> None:
        while True:
            req = self._work.get()
            if req is None:
                return
            try:
                self._handle(req)
            except Exception as exc:  # never lose the request: answer it
                log.exception("node %s: image %s failed", self.node_id, req.image_id)
                self._answer_error(req, ErrorCode.INTERNAL, f"internal error: {exc}")

    def _handle(self, req: ImageRequest) -> None:
        model = self._model
        if req.invalid is not None:
            self._answer_error(req, *req.invalid)
        elif req.expired:
            self._answer_error(req, ErrorCode.EXPIRED, "message expiry passed while queued")
        elif model is None:
            self._answer_error(req, ErrorCode.NO_MODEL, "this node has no model loaded yet")
        else:
            try:
                x = self.classifier.prepare(req, model)
            except ImageError as exc:
                self._answer_error(req, exc.code, str(exc), model)
                return
            model.start(x, (req, model))

    def _on_inferred(
        self, probs: np.ndarray | None, userdata: Any, error: BaseException | None
    ) -> None:
        """OpenVINO thread: one inference finished."""
        req, model = userdata
        if probs is None:
            self._answer_error(req, ErrorCode.INTERNAL, f"inference failed: {error}", model)
            return
        self._answer(req, self.classifier.ok_result(req, model, probs))

    def _answer_error(
        self, req: ImageRequest, code: ErrorCode, message: str, model: ServingModel | None = None
    ) -> None:
        log.info(
            "node %s: image %s from %s: %s (%s)",
            self.node_id,
            req.image_id,
            req.source or "direct",
            code.value,
            message,
        )
        self._answer(req, self.classifier.error_result(req, code, message, model or self._model))

    def _result_topic(self, req: ImageRequest) -> str | None:
        """Response Topic if given, else `results/{source}` (`results/{node_id}` for direct
        images); None when neither exists (an images topic with an invalid source)."""
        if req.response_topic:
            return req.response_topic
        if req.direct:
            return self.topics.results(self.node_id)
        if req.source is not None:
            return self.topics.results(req.source)
        return None

    def _answer(self, req: ImageRequest, result: Result) -> None:
        self.stats.answered()
        topic = self._result_topic(req)
        if topic is None:
            log.warning(
                "node %s: image %s has no valid result topic; dropped after logging",
                self.node_id,
                req.image_id,
            )
            self._done(req, result, published=False)
            return
        props = PublishProps(correlation_data=req.correlation_data, content_type="application/json")
        try:
            self.mqtt.publish(
                topic,
                result.to_json(),
                qos=1,
                props=props,
                on_done=lambda ok: self._done(req, result, published=ok),
            )
        except (ValueError, MqttError) as exc:
            log.warning(
                "node %s: cannot publish result for %s to %r: %s",
                self.node_id,
                req.image_id,
                topic,
                exc,
            )
            self._done(req, result, published=False)

    def _done(self, req: ImageRequest, result: Result, *, published: bool) -> None:
        """The Result is with the broker (or cannot be delivered): ack the image."""
        if not published:
            log.warning(
                "node %s: result for %s was not accepted by the broker", self.node_id, req.image_id
            )
        self.mqtt.ack(req.mid, req.qos, req.generation)
        self.stats.finished(result.timings_ms.total, error=result.status == "error")
        if result.status == "ok":
            log.debug(
                "node %s: image %s -> %s %.3f",
                self.node_id,
                req.image_id,
                result.label,
                result.confidence or 0.0,
            )
