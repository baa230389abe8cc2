"""The node's image path: a received image -> exactly one Result -> acknowledged.

Threads (STYLE.md, "Threads"):
- paho's network thread parses each image and puts it in the Backlog (a bounded
  wait, never an unbounded one: node/backlog.py);
- `decode_workers` threads decode and preprocess, then start the inference on the
  current model's AsyncInferQueue;
- OpenVINO's completion callback builds the Result and publishes it; the watchdog
  (NodeService) answers inferences the device never finished with `device_error`;
- once the broker acknowledged the Result, the image is acknowledged (manual ack),
  so an image is only dropped by the broker after its answer is safe.

Every path ends in `_answer` and then `_done`, once per image: ok, an error code, or
(at a stop) handed back unanswered for the broker to deliver again. Images that were
in progress when the node crashed (node/journal.py) are retried alone, once; the next
time they are answered `poison_image`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from cellwatch.node.backlog import Backlog
from cellwatch.node.classifier import Classifier
from cellwatch.node.decode import ImageError
from cellwatch.node.engine import ServingModel
from cellwatch.node.errors import InferenceError, ModelRetired
from cellwatch.node.faults import Faults
from cellwatch.node.journal import POISON_AFTER_CRASHES, Journal
from cellwatch.node.requests import ImageRequest, parse_message
from cellwatch.node.stats import Stats
from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.errors import MqttError
from cellwatch.shared.mqtt import MqttClient, PublishProps
from cellwatch.shared.schemas import Result
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)


class ImagePipeline:
    def __init__(
        self,
        *,
        node_id: str,
        mqtt: MqttClient,
        topics: Topics,
        classifier: Classifier,
        stats: Stats,
        journal: Journal,
        faults: Faults,
        model: Callable[[], ServingModel | None],
        capacity: int,
        put_wait_s: float,
        start_wait_s: float,
        on_device_error: Callable[[int], None],
    ) -> None:
        self.node_id = node_id
        self.mqtt = mqtt
        self.topics = topics
        self.classifier = classifier
        self.stats = stats
        self.journal = journal
        self.faults = faults
        self._model = model
        self.backlog: Backlog[ImageRequest] = Backlog(capacity)
        self._put_wait_s = put_wait_s
        self._start_wait_s = start_wait_s
        self._on_device_error = on_device_error
        self._accepting = threading.Event()
        self._suspect = threading.Semaphore(1)
        """At most one image that was in progress during a crash is processed at a time."""
        self._lock = threading.Lock()
        self._device_errors = 0
        """Consecutive device errors (reset by any inference that succeeds)."""

    # -- intake (network thread) -----------------------------------------------------
    def accept(self, on: bool) -> None:
        """While off, arriving images are left unacknowledged: the broker delivers them
        again to this node's next connection."""
        if on:
            self._accepting.set()
        else:
            self._accepting.clear()

    def on_message(self, msg: paho.MQTTMessage) -> None:
        """Parse and enqueue: never more than a bounded wait (node/backlog.py)."""
        ack = self.mqtt.ack_token(msg)
        if msg.retain:
            # A replay of a retained image on (re)subscribe: answering it would answer
            # it again on every reconnect. It was answered when it was first published.
            log.warning(
                "node %s: ignoring a retained image on %s (replayed on subscribe)",
                self.node_id,
                msg.topic,
            )
            self.stats.retained_ignored += 1
            ack()
            return
        if not self._accepting.is_set():
            return
        req = parse_message(msg, self.topics, self.node_id, ack)
        req.crashes = self.journal.crashes(req.image_id)
        self.stats.started()
        self.backlog.put(req, self._put_wait_s)

    # -- decode workers -------------------------------------------------------------------
    def worker_loop(self) -> None:
        while True:
            req = self.backlog.get()
            if req is None:
                return
            try:
                self._handle(req)
            except Exception as exc:  # never lose the request: answer it
                log.exception("node %s: image %s failed", self.node_id, req.image_id)
                self._answer_error(req, ErrorCode.INTERNAL, f"internal error: {exc}")

    def _handle(self, req: ImageRequest) -> None:
        if req.invalid is not None:
            self._answer_error(req, *req.invalid)
            return
        if req.crashes >= POISON_AFTER_CRASHES:
            self._answer_error(
                req,
                ErrorCode.POISON_IMAGE,
                f"image {req.image_id} was being processed when this node crashed "
                f"{req.crashes} times; it is not processed again",
            )
            return
        if req.expired:
            self._answer_error(req, ErrorCode.EXPIRED, "message expiry passed while queued")
            return
        if self._model() is None:
            self._answer_error(req, ErrorCode.NO_MODEL, "this node has no model loaded yet")
            return
        if req.crashes:
            log.warning(
                "node %s: image %s was in progress during a crash: retrying it alone",
                self.node_id,
                req.image_id,
            )
            self._suspect.acquire()
            req.release = self._suspect.release
        self.journal.started(req.image_id)
        req.journaled = True
        self.faults.crash_if_poison(req.image_id)
        self._infer(req)

    def _infer(self, req: ImageRequest) -> None:
        x: np.ndarray | None = None
        prepared_for: Any = None
        while True:
            model = self._model()
            if model is None:
                self._answer_error(req, ErrorCode.NO_MODEL, "this node's model was unloaded")
                return
            spec = model.bundle.manifest.preprocessing
            if x is None or prepared_for != spec:
                try:
                    x = self.classifier.prepare(req, model)
                except ImageError as exc:
                    self._answer_error(req, exc.code, str(exc), model)
                    return
                prepared_for = spec
            try:
                model.start(x, req, wait_s=self._start_wait_s)
                return
            except ModelRetired:
                continue  # swapped while we waited: start on the new model
            except InferenceError as exc:
                self.device_error(model, req, exc)
                return

    # -- completions (OpenVINO thread or the watchdog) ----------------------------------
    def on_inferred(
        self, model: ServingModel, probs: np.ndarray | None, req: Any, error: BaseException | None
    ) -> None:
        """One inference ended. Never raises (it runs inside OpenVINO's callback)."""
        try:
            if probs is None:
                self.device_error(model, req, error)
                return
            with self._lock:
                self._device_errors = 0
            self._answer(req, self.classifier.ok_result(req, model, probs))
        except Exception as exc:
            log.exception("node %s: completing image %s failed", self.node_id, req.image_id)
            self._answer_error(req, ErrorCode.INTERNAL, f"internal error: {exc}", model)

    def device_error(
        self, model: ServingModel, req: ImageRequest, error: BaseException | None
    ) -> None:
        with self._lock:
            self._device_errors += 1
            count = self._device_errors
        self._answer_error(
            req,
            ErrorCode.DEVICE_ERROR,
            f"inference on {model.config.device} failed: {error}",
            model,
        )
        self._on_device_error(count)

    # -- answers ----------------------------------------------------------------------------
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
        self._answer(req, self.classifier.error_result(req, code, message, model or self._model()))

    def _result_topic(self, req: ImageRequest) -> str | None:
        """Response Topic if given (and under replies/), else `results/{source}`
        (`results/{node_id}` for direct images); None when neither exists (an images
        topic with an invalid source and no usable Response Topic)."""
        if req.response_topic:
            return req.response_topic
        if req.direct:
            return self.topics.results(self.node_id)
        if req.source is not None:
            return self.topics.results(req.source)
        return None

    def _answer(self, req: ImageRequest, result: Result) -> None:
        if req.answered:
            log.warning("node %s: image %s answered twice: dropped", self.node_id, req.image_id)
            return
        req.answered = True
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
        except MqttError as exc:
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
        req.ack()
        self._release(req)
        self.stats.finished(
            result.timings_ms.total,
            error=result.status == "error",
            code=result.error.code if result.error else None,
        )
        if result.status == "ok":
            log.debug(
                "node %s: image %s -> %s %.3f",
                self.node_id,
                req.image_id,
                result.label,
                result.confidence or 0.0,
            )

    def _release(self, req: ImageRequest) -> None:
        if req.journaled or req.crashes:
            self.journal.finished(req.image_id)
        release, req.release = req.release, None
        if release is not None:
            release()

    # -- stop ------------------------------------------------------------------------------
    def abandon(self, req: ImageRequest) -> None:
        """Hand an unanswered image back: not acknowledged, so the broker delivers it
        again to this node's next session."""
        if not req.answered:
            req.answered = True
            self.stats.abandoned()
            self._release(req)

    def close(self) -> int:
        """Stop the workers; the images still queued are handed back. Returns how many."""
        left = self.backlog.close()
        for req in left:
            self.abandon(req)
        return len(left)


def wait_until(predicate: Callable[[], bool], deadline: float, step: float = 0.02) -> bool:
    """Poll predicate until it holds or the monotonic deadline passes."""
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True
