"""The node's image path: a received image -> exactly one Result -> acknowledged.

An image crosses four threads, and never waits on paho's network thread:
1. the edge (paho's network thread) checks it against the image route (byte cap,
   where its Result may go: `requests.image_replies`, the sending account's own
   replies or results); `on_image` reads the request (node/requests.py: topic and
   properties, nothing hashed) and puts it in the backlog, which never waits
   (shared/handoff.py). Back-pressure: while `max_inflight` images wait, the
   connection reads nothing more from the broker (`on_full` and `on_room` hold and
   release it, shared/mqttloop.py), so TCP stops the broker while Results, acks and
   keepalive still go out;
2. one of `decode_workers` threads hashes it and looks its crash count up in the
   crash journal (node/journal.py, keyed on the sender and the content:
   `requests.journal_key`), notes it there, decodes and preprocesses it, and starts
   the inference on the current model's AsyncInferQueue;
3. OpenVINO's completion callback builds the Result and replies with it (the
   watchdog, node/health.py, answers inferences the device never finished with
   `device_error`);
4. once the broker acknowledged the Result (paho's network thread again), the image
   is acknowledged and its journal entry closed, neither of which waits: an image is
   only dropped by the broker after its answer is safe. An ok Result's image is then
   offered to the node's observers (node/observers.py: drift, the shadow candidate),
   which work on a thread of their own at a lower priority: nothing they do delays a
   Result.

Every path ends in `_answer` and then `_done`, once per image: ok, an error code, or
(at a stop) handed back unanswered for the broker to deliver again. Images that were
in progress when the node crashed (node/journal.py) are retried alone, once; the next
time they are answered `poison_image`.

An empty payload without a Response Topic on an images topic (how the operator clears
a retained image) is acknowledged without a Result. A retained image the broker
replays on (re)subscribe is acknowledged without a Result too (it was answered when
it was published), logged with the operator's remedy, and counted in the node's
telemetry (`retained_images`), which the hub shows (its page and /metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cellwatch.node.classifier import Classifier
from cellwatch.node.decode import ImageError
from cellwatch.node.engine import ServingModel
from cellwatch.node.errors import InferenceError, ModelRetired
from cellwatch.node.faults import FaultPoint, Faults
from cellwatch.node.journal import POISON_AFTER_CRASHES, Journal
from cellwatch.node.observers import Observation, Observers
from cellwatch.node.requests import (
    ImageRequest,
    Invalid,
    image_replies,
    journal_key,
    read_request,
    refused_response_topic,
)
from cellwatch.node.stats import Stats
from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.errors import MqttError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.rpc import Acks, Delivery, Inbound, Rejected, Route, raw
from cellwatch.shared.schemas import Result, utcnow
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Job:
    """One received image on its way to exactly one answer."""

    delivery: Delivery
    req: ImageRequest
    invalid: Invalid | None
    """Why the request is answered with an error without being classified."""
    key: str = ""
    """The journal key (requests.journal_key), set by the decode worker."""
    crashes: int = 0
    """Abnormal stops of this node while this image was in progress (node/journal.py),
    as the journal said when a decode worker took it."""
    answered: bool = False
    journaled: bool = False
    release: Callable[[], None] | None = None
    """Frees the one-suspect-at-a-time slot once this (suspect) image is done."""
    pixels: np.ndarray | None = None
    """The model's input, kept for the observers until the Result is safe."""
    size: tuple[int, int] = (0, 0)
    """The image's width and height (its header's)."""
    model: ServingModel | None = None
    """The model that answered."""


class ImagePipeline:
    def __init__(
        self,
        *,
        node_id: str,
        topics: Topics,
        classifier: Classifier,
        stats: Stats,
        journal: Journal,
        faults: Faults,
        model: Callable[[], ServingModel | None],
        capacity: int,
        start_wait_s: float,
        on_device_error: Callable[[int], None],
        on_full: Callable[[], None],
        on_room: Callable[[], None],
        observers: Observers | None = None,
    ) -> None:
        self.node_id = node_id
        self.observers = observers
        self.topics = topics
        self.classifier = classifier
        self.stats = stats
        self.journal = journal
        self.faults = faults
        self._model = model
        self.backlog: Handoff[Job] = Handoff(
            capacity, name=f"node {node_id}: backlog", on_full=on_full, on_room=on_room
        )
        self._start_wait_s = start_wait_s
        self._on_device_error = on_device_error
        self._accepting = threading.Event()
        self._suspect = threading.Semaphore(1)
        """At most one image that was in progress during a crash is processed at a time."""
        self._lock = threading.Lock()
        self._device_errors = 0
        """Consecutive device errors (reset by any inference that succeeds)."""

    def routes(self) -> list[Route[bytes]]:
        """The image routes: every lab's images topics `images/{account}[/{scope}]`
        (through the shared subscription) and this node's own
        `nodes/{node_id}/images/{account}[/{scope}]`; raw bytes up to
        `max_image_bytes`, Results where `requests.image_replies` says; acknowledged
        once the Result is safe."""
        t = self.topics
        image = Route(
            "",
            raw,
            self.on_image,
            max_bytes=self.classifier.limits.max_bytes,
            reply=image_replies(t, self.node_id),
            on_rejected=self.on_rejected,
            acks=Acks.HANDLER,
            name="image",
        )
        shared = zip(t.lab_images_filters(), self.shared_subscriptions(), strict=True)
        return [replace(image, filter=f, subscription=s) for f, s in shared] + [
            replace(image, filter=f) for f in t.node_lab_images_filters(self.node_id)
        ]

    def shared_subscriptions(self) -> tuple[str, ...]:
        """What a stopping node leaves first (so nothing more is routed to it)."""
        return self.topics.lab_images_shared_filters()

    # -- intake (network thread) -----------------------------------------------------
    def accept(self, on: bool) -> None:
        """While off, arriving images are left unacknowledged: the broker delivers them
        again to this node's next connection."""
        if on:
            self._accepting.set()
        else:
            self._accepting.clear()

    def on_image(self, inbound: Inbound[bytes]) -> None:
        """Hand the image to a decode worker; never waits."""
        self._take(inbound, None)

    def on_rejected(self, rejected: Rejected) -> None:
        """A payload over the byte cap: answered `payload_too_large` like any image."""
        self._take(rejected, rejected.reason)

    def _take(self, delivery: Delivery, too_large: str | None) -> None:
        if not delivery.message.payload and delivery.message.response_topic is None:
            # How the operator clears a retained image (`mosquitto_pub -r -n`): nobody
            # waits for an answer. (A client's empty image has a Response Topic: it is
            # answered `undecodable_image` like any other image that is not one.)
            delivery.ack()
            return
        if delivery.message.retained:
            # A replay of a retained image on (re)subscribe: answering it would answer
            # it again on every reconnect. It was answered when it was first published.
            # The broker keeps it (and its memory) until someone clears it.
            log.warning(
                "node %s: a retained image on %s (replayed on subscribe) is stored in the "
                "broker: acknowledged without a Result. Clear it: mosquitto_pub -u operator "
                "... -t %s -r -n",
                self.node_id,
                delivery.topic,
                delivery.topic,
            )
            self.stats.retained()
            delivery.ack()
            return
        if not self._accepting.is_set():
            return
        self.stats.started()
        message = delivery.message
        req, invalid = read_request(message, self.topics, self.node_id, utcnow(), time.monotonic())
        refused = delivery.reply_to.refused
        if refused is not None:
            invalid = refused_response_topic(refused, self.topics, req.source)
        elif invalid is None and too_large is not None:
            invalid = (ErrorCode.PAYLOAD_TOO_LARGE, too_large)
        self.backlog.put(Job(delivery, req, invalid))

    # -- decode workers -------------------------------------------------------------------
    def worker_loop(self) -> None:
        while (job := self.backlog.get()) is not None:
            try:
                self._handle(job)
            except Exception as exc:  # never lose the request: answer it
                log.exception("node %s: image %s failed", self.node_id, job.req.image_id)
                self._answer_error(job, ErrorCode.INTERNAL, f"internal error: {exc}")

    def _handle(self, job: Job) -> None:
        req = job.req
        job.key = journal_key(req)  # hashes the payload: here, not on the network thread
        job.crashes = self.journal.crashes(job.key)
        if job.invalid is not None:
            self._answer_error(job, *job.invalid)
            return
        if job.crashes >= POISON_AFTER_CRASHES:
            self._answer_error(
                job,
                ErrorCode.POISON_IMAGE,
                f"image {req.image_id} was being processed when this node crashed "
                f"{job.crashes} times; it is not processed again",
            )
            return
        expiry = job.delivery.message.expiry_s
        if expiry is not None and time.monotonic() > req.received_mono + expiry:
            self._answer_error(job, ErrorCode.EXPIRED, "message expiry passed while queued")
            return
        if self._model() is None:
            self._answer_error(job, ErrorCode.NO_MODEL, "this node has no model loaded yet")
            return
        if job.crashes:
            log.warning(
                "node %s: image %s was in progress during a crash: retrying it alone",
                self.node_id,
                req.image_id,
            )
            self._suspect.acquire()
            job.release = self._suspect.release
        self.journal.started(job.key)
        job.journaled = True
        self.faults.at(FaultPoint.DECODE, key=req.image_id)
        self._infer(job, req)

    def _infer(self, job: Job, req: ImageRequest) -> None:
        x: np.ndarray | None = None
        prepared_for: Any = None
        while True:
            model = self._model()
            if model is None:
                self._answer_error(job, ErrorCode.NO_MODEL, "this node's model was unloaded")
                return
            spec = model.bundle.manifest.preprocessing
            if x is None or prepared_for != spec:
                try:
                    x, width, height = self.classifier.prepare(req, model)
                except ImageError as exc:
                    self._answer_error(job, exc.code, str(exc), model)
                    return
                prepared_for = spec
                if self.observers is not None:
                    job.pixels, job.size = x, (width, height)
            try:
                model.start(x, job, wait_s=self._start_wait_s)
                return
            except ModelRetired:
                continue  # swapped while we waited: start on the new one
            except InferenceError as exc:
                self.device_error(model, job, exc)
                return

    # -- completions (OpenVINO thread or the watchdog) ----------------------------------
    def on_inferred(
        self, model: ServingModel, probs: np.ndarray | None, job: Any, error: BaseException | None
    ) -> None:
        """One inference ended. Never raises (it runs inside OpenVINO's callback)."""
        try:
            if probs is None:
                self.device_error(model, job, error)
                return
            with self._lock:
                self._device_errors = 0
            job.model = model
            self._answer(job, self.classifier.ok_result(job.req, model, probs))
        except Exception as exc:
            log.exception("node %s: completing image %s failed", self.node_id, job.req.image_id)
            self._answer_error(job, ErrorCode.INTERNAL, f"internal error: {exc}", model)

    def device_error(self, model: ServingModel, job: Job, error: BaseException | None) -> None:
        with self._lock:
            self._device_errors += 1
            count = self._device_errors
        self._answer_error(
            job,
            ErrorCode.DEVICE_ERROR,
            f"inference on {model.config.device} failed: {error}",
            model,
        )
        self._on_device_error(count)

    # -- answers ----------------------------------------------------------------------------
    def _answer_error(
        self, job: Job, code: ErrorCode, message: str, model: ServingModel | None = None
    ) -> None:
        req = job.req
        log.info(
            "node %s: image %s from %s: %s (%s)",
            self.node_id,
            req.image_id,
            req.source or "direct",
            code.value,
            message,
        )
        self._answer(job, self.classifier.error_result(req, code, message, model or self._model()))

    def _answer(self, job: Job, result: Result) -> None:
        if job.answered:
            log.warning("node %s: image %s answered twice: dropped", self.node_id, result.image_id)
            return
        job.answered = True
        self.stats.answered()
        try:
            sent = job.delivery.reply(
                result.to_json(),
                content_type="application/json",
                on_done=lambda ok: self._done(job, result, published=ok),
            )
        except MqttError as exc:
            log.warning(
                "node %s: cannot publish result for %s to %r: %s",
                self.node_id,
                result.image_id,
                job.delivery.reply_to.topic,
                exc,
            )
            sent = False
        if not sent:
            if job.delivery.reply_to.topic is None:
                log.warning(
                    "node %s: image %s has no valid result topic; dropped after logging",
                    self.node_id,
                    result.image_id,
                )
            self._done(job, result, published=False)

    def _done(self, job: Job, result: Result, *, published: bool) -> None:
        """The Result is with the broker (or cannot be delivered): ack the image. Runs
        on paho's network thread (or the publishing one): nothing here waits."""
        if not published:
            log.warning(
                "node %s: result for %s was not accepted by the broker",
                self.node_id,
                result.image_id,
            )
        job.delivery.ack()
        self._release(job)
        self.stats.finished(
            result.timings_ms.total,
            error=result.status == "error",
            code=result.error.code if result.error else None,
        )
        if result.status == "ok":
            log.debug(
                "node %s: image %s -> %s %.3f",
                self.node_id,
                result.image_id,
                result.label,
                result.confidence or 0.0,
            )
            self._observe(job, result, published)

    def _observe(self, job: Job, result: Result, published: bool) -> None:
        """Offer the answered image to the observers (never waits); the job lets go of
        its pixels either way."""
        pixels, model, job.pixels = job.pixels, job.model, None
        if self.observers is None or not published or pixels is None or model is None:
            return
        width, height = job.size
        self.observers.offer(Observation(result, pixels, job.req.payload, width, height, model))

    def _release(self, job: Job) -> None:
        # An answer clears the image's crash count, except poison_image's: the same
        # content from the same account would crash the node again (node/journal.py).
        poisoned = job.crashes >= POISON_AFTER_CRASHES and not job.journaled
        if job.journaled or (job.crashes and not poisoned):
            self.journal.finished(job.key)
        release, job.release = job.release, None
        if release is not None:
            release()

    # -- stop ------------------------------------------------------------------------------
    def abandon(self, job: Job) -> None:
        """Hand an unanswered image back: not acknowledged, so the broker delivers it
        again to this node's next session."""
        if not job.answered:
            job.answered = True
            self.stats.abandoned()
            self._release(job)

    def close(self) -> int:
        """Stop the workers; the images still queued are handed back. Returns how many."""
        left = self.backlog.close()
        for job in left:
            self.abandon(job)
        return len(left)


def wait_until(predicate: Callable[[], bool], deadline: float, step: float = 0.02) -> bool:
    """Poll predicate until it holds or the monotonic deadline passes."""
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True
