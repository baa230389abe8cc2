"""The shadow phase on a node: a candidate model beside the serving one, scored on a
share of the live images after they were answered (DESIGN.md, Rollout).

`ShadowLoader` loads the candidate when the hub's retained `ShadowOrder` names one (on
the update agent's thread, node/updater.py: fetched and verified as any bundle, kept
in the store, compiled on the node's device for one image at a time with
`shadow.threads` CPU threads, self-tested). It refuses, with a code and the serving
model untouched, a candidate whose labels or input differ from the serving model's
(`incompatible`: their answers to one input cannot be compared) and one that would
leave less than `shadow.min_free_mb` of memory free (`insufficient_memory`).

`ShadowScorer` is an observer (node/observers.py) of every answered image. It samples
`rate` of them; a sampled image is scored only while no live image waits for its
Result (at most `shadow.max_live`), otherwise it is skipped and counted, so the rate
is a ceiling; a live image that arrives while the candidate runs cancels it (within
a millisecond: `ServingModel.infer_unless`), and that image is skipped too, so
shadow work never competes with a live image for long. Scoring runs the candidate on
the very input the serving model saw and compares the labels (each under its own
bundle's decision rule) and the probabilities. Every `shadow.window_s`
the window closes and goes to the hub on `nodes/{node_id}/shadow-report`: n,
agreements, the confusion of serving x candidate labels, mean and max |Δp|, both
inference latencies (p50/p99), skipped images, and each disagreeing image's hash,
source and both answers (never its pixels). A window's id is the node process's boot
id and the window's number: the hub counts it once however often it arrives.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import psutil

from cellwatch.node.classifier import decide
from cellwatch.node.engine import EngineConfig, ServingModel
from cellwatch.node.errors import NodeError
from cellwatch.node.observers import Observation
from cellwatch.shared.bundle import Bundle
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.errors import MqttError
from cellwatch.shared.limits import MiB
from cellwatch.shared.rpc import Publisher
from cellwatch.shared.schemas import (
    MAX_WINDOW_DISAGREEMENTS,
    Disagreement,
    LatencyPair,
    ModelRef,
    ShadowOrder,
    ShadowReport,
    ShadowWindow,
    UpdateError,
    utcnow,
)
from cellwatch.shared.states import ShadowState
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

COMPILED_WEIGHT_FACTOR = 2.0
"""A compiled model holds about this many times its weights' file size (OpenVINO
unpacks fp16 weights and keeps its own layouts: bench/shadow.py measures the RSS with
one and two models)."""
COMPILE_OVERHEAD_BYTES = 64 * MiB


class ShadowRefused(NodeError):
    """The candidate cannot be loaded beside the serving model; `code` says why."""

    def __init__(self, code: UpdateErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def memory_needed(bundle: Bundle) -> int:
    """Bytes a compiled copy of bundle is expected to take."""
    weights = bundle.manifest.files["model.bin"].size
    return int(weights * COMPILED_WEIGHT_FACTOR) + COMPILE_OVERHEAD_BYTES


def check_beside(candidate: Bundle, serving: ServingModel | None, min_free_mb: int) -> None:
    """ShadowRefused unless candidate can be scored beside serving, in the memory free."""
    if serving is not None:
        a, c = serving.bundle.manifest, candidate.manifest
        if a.labels != c.labels:
            raise ShadowRefused(
                UpdateErrorCode.INCOMPATIBLE,
                f"{candidate} has labels {c.labels}, the serving {serving.bundle} {a.labels}: "
                "their answers cannot be compared",
            )
        if a.preprocessing != c.preprocessing or a.input.shape != c.input.shape:
            raise ShadowRefused(
                UpdateErrorCode.INCOMPATIBLE,
                f"{candidate} takes another input ({c.input.shape}, {c.preprocessing}) than "
                f"the serving {serving.bundle}: it cannot score the same preprocessed image",
            )
    need = memory_needed(candidate)
    free = psutil.virtual_memory().available
    if free - need < min_free_mb * MiB:
        raise ShadowRefused(
            UpdateErrorCode.INSUFFICIENT_MEMORY,
            f"{candidate} needs about {need / MiB:.0f} MiB beside the serving model; "
            f"{free / MiB:.0f} MiB are free and shadow.min_free_mb = {min_free_mb} must stay "
            "free: refused, the serving model is untouched",
        )


def shadow_engine(engine: EngineConfig, threads: int) -> EngineConfig:
    """The candidate's engine: one image at a time, on `threads` CPU threads."""
    return EngineConfig(
        device=engine.device,
        performance_hint="latency",
        force_f32=engine.force_f32,
        infer_requests=1,
        cache_dir=engine.cache_dir,
        infer_timeout_s=engine.infer_timeout_s,
        threads=threads,
    )


@dataclass
class _Window:
    started_at: datetime
    started_mono: float
    n: int = 0
    agreements: int = 0
    skipped: int = 0
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    dp_sum: float = 0.0
    dp_max: float = 0.0
    active_ms: list[float] = field(default_factory=list)
    candidate_ms: list[float] = field(default_factory=list)
    disagreements: list[Disagreement] = field(default_factory=list)
    more: int = 0

    def closed(self, window_id: str) -> ShadowWindow:
        def pair(values: list[float]) -> LatencyPair | None:
            if not values:
                return None
            p50, p99 = np.percentile(np.array(values, np.float64), [50, 99])
            return LatencyPair(p50=round(float(p50), 3), p99=round(float(p99), 3))

        return ShadowWindow(
            window_id=window_id,
            started_at=self.started_at,
            ended_at=utcnow(),
            n=self.n,
            agreements=self.agreements,
            skipped=self.skipped,
            confusion=self.confusion,
            mean_abs_dp=round(self.dp_sum / self.n, 6) if self.n else None,
            max_abs_dp=round(self.dp_max, 6) if self.n else None,
            active_ms=pair(self.active_ms),
            candidate_ms=pair(self.candidate_ms),
            disagreements=self.disagreements,
            more_disagreements=self.more,
        )


class ShadowScorer:
    """The observer and its windows (see the module docstring); thread-safe."""

    def __init__(
        self,
        *,
        node_id: str,
        boot_id: str,
        publisher: Publisher,
        topics: Topics,
        window_s: float,
        max_live: int,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.boot_id = boot_id
        self.publisher = publisher
        self.topics = topics
        self.window_s = window_s
        self.max_live = max_live
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._order: ShadowOrder | None = None
        self._candidate: ServingModel | None = None
        self._window: _Window | None = None
        self._seq = 0
        self.scored = 0
        self.skipped = 0
        """Since start (the windows carry their own counts)."""
        self.on_disagreement: Callable[[Observation], None] = lambda obs: None
        """Told of each image the candidate disagreed on (field samples, node/samples.py)."""

    # -- the update agent's side -----------------------------------------------------------
    def current(self) -> ShadowOrder | None:
        """The order being carried out (None: no candidate loaded)."""
        return self._order

    def candidate(self) -> ServingModel | None:
        return self._candidate

    def start(self, order: ShadowOrder, candidate: ServingModel) -> None:
        """Score candidate from now on (after stopping any other)."""
        assert order.model is not None
        with self._lock:
            closed = self._close()
            self._order, self._candidate = order, candidate
            self._window = _Window(utcnow(), time.monotonic())
        self._send(closed)
        log.info(
            "node %s: rollout %s: shadowing %s beside the serving model (%.0f%% of images)",
            self.node_id,
            order.rollout_id,
            candidate.bundle,
            order.rate * 100,
        )
        self.report(order.rollout_id, order.model, ShadowState.SHADOWING)

    def set_rate(self, order: ShadowOrder) -> None:
        """The same candidate, maybe another rate (the retained order again)."""
        with self._lock:
            self._order = order
        assert order.model is not None
        self.report(order.rollout_id, order.model, ShadowState.SHADOWING)

    def stop(self, why: str) -> None:
        """Close the window, report it and `stopped`, let the candidate go."""
        with self._lock:
            order, closed = self._order, self._close()
            self._order = self._candidate = self._window = None
        self._send(closed)
        if order is not None and order.model is not None:
            log.info(
                "node %s: rollout %s: shadow stopped (%s)", self.node_id, order.rollout_id, why
            )
            self.report(order.rollout_id, order.model, ShadowState.STOPPED)

    def report(
        self,
        rollout_id: str,
        model: ModelRef,
        state: ShadowState,
        *,
        progress: float = 0.0,
        error: UpdateError | None = None,
        window: ShadowWindow | None = None,
    ) -> None:
        report = ShadowReport(
            rollout_id=rollout_id,
            model=model,
            state=state,
            progress=round(min(max(progress, 0.0), 1.0), 4),
            error=error,
            window=window,
            ts=utcnow(),
        )
        try:
            self.publisher.publish(self.topics.shadow_report(self.node_id), report.to_json(), qos=1)
        except MqttError as exc:
            log.warning("node %s: cannot send the shadow report: %s", self.node_id, exc)

    def failed(self, rollout_id: str, model: ModelRef, code: UpdateErrorCode, message: str) -> None:
        log.error(
            "node %s: rollout %s: cannot shadow %s (%s): %s",
            self.node_id,
            rollout_id,
            model,
            code,
            message,
        )
        self.report(
            rollout_id,
            model,
            ShadowState.FAILED,
            error=UpdateError(code=code, message=message[:2048]),
        )

    # -- periodic ----------------------------------------------------------------------
    def flush(self, force: bool = False) -> None:
        """Close and send the window once `window_s` has passed (or now with force)."""
        with self._lock:
            w = self._window
            if w is None or not (force or time.monotonic() - w.started_mono >= self.window_s):
                return
            closed = self._close()
            self._window = _Window(utcnow(), time.monotonic())
        self._send(closed)

    def _close(self) -> tuple[ShadowOrder, ShadowWindow] | None:
        """Lock held: the window as a message (None: nothing to say)."""
        w, order = self._window, self._order
        if w is None or order is None or (w.n == 0 and w.skipped == 0):
            return None
        self._seq += 1
        return order, w.closed(f"{self.boot_id}-{self._seq}")

    def _send(self, closed: tuple[ShadowOrder, ShadowWindow] | None) -> None:
        if closed is None:
            return
        order, window = closed
        assert order.model is not None
        self.report(order.rollout_id, order.model, ShadowState.SHADOWING, window=window)

    # -- observer ----------------------------------------------------------------------
    def _sampled(self) -> ServingModel | None:
        """The candidate, if this image is one of the share sampled for it."""
        order, candidate = self._order, self._candidate
        if order is None or candidate is None or self._rng.random() >= order.rate:
            return None
        return candidate

    def missed(self, obs: Observation) -> None:
        if self._sampled() is not None:
            self._skip()

    def _skip(self) -> None:
        with self._lock:
            self.skipped += 1
            if self._window is not None:
                self._window.skipped += 1

    def observe(self, obs: Observation, waiting: Callable[[], int]) -> None:
        candidate = self._sampled()
        if candidate is None:
            return
        if obs.model.bundle.manifest_sha256 == candidate.bundle.manifest_sha256:
            return  # the node serves the candidate already: nothing to compare
        if waiting() > self.max_live:
            self._skip()
            return
        t0 = time.monotonic()
        try:  # a live image that arrives meanwhile cancels it: skipped too
            probs = candidate.infer_unless(obs.pixels, lambda: waiting() > self.max_live)
        except RuntimeError as exc:
            log.warning("node %s: shadow inference failed: %s", self.node_id, exc)
            self._skip()
            return
        if probs is None:
            self._skip()
            return
        ms = (time.monotonic() - t0) * 1000.0
        idx, _, _ = decide(candidate.bundle.manifest, probs)
        result = obs.result
        active = result.probabilities or {}
        theirs = {
            label: float(np.clip(p, 0.0, 1.0))
            for label, p in zip(candidate.labels, probs, strict=True)
        }
        dp = max((abs(active.get(k, 0.0) - v) for k, v in theirs.items()), default=0.0)
        a_label, c_label = result.label or "", candidate.labels[idx]
        disagreement = None
        if a_label != c_label:
            disagreement = Disagreement(
                image_sha256=hashlib.sha256(obs.payload).hexdigest(),
                source=result.source,
                active_label=a_label,
                candidate_label=c_label,
                active=active,
                candidate=theirs,
            )
        with self._lock:
            w = self._window
            if w is None or self._candidate is not candidate:
                return  # stopped or swapped meanwhile
            self.scored += 1
            w.n += 1
            w.agreements += a_label == c_label
            row = w.confusion.setdefault(a_label, {})
            row[c_label] = row.get(c_label, 0) + 1
            w.dp_sum += dp
            w.dp_max = max(w.dp_max, dp)
            w.active_ms.append(result.timings_ms.infer)
            w.candidate_ms.append(ms)
            if disagreement is not None:
                self.on_disagreement(obs)
                if len(w.disagreements) < MAX_WINDOW_DISAGREEMENTS:
                    w.disagreements.append(disagreement)
                else:
                    w.more += 1
