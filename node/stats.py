"""Counters and a sliding latency window for the node's telemetry."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import psutil

from cellwatch.shared.schemas import Latency


class Stats:
    """Thread-safe: completions are recorded from OpenVINO and paho threads."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._done: deque[tuple[float, float]] = deque()  # (monotonic end, total ms)
        self.processed = 0
        self.errors = 0
        self._errors_by_code: dict[str, int] = {}
        self.inflight = 0
        self.peak_inflight = 0
        self.unanswered = 0
        """Received, Result not yet handed to MQTT (inflight also counts unacked ones)."""
        self.peak_unanswered = 0
        self.retained_images = 0
        """Retained images replayed on subscribe and acknowledged without a Result."""
        self._process = psutil.Process()

    def started(self) -> None:
        with self._lock:
            self.inflight += 1
            self.peak_inflight = max(self.peak_inflight, self.inflight)
            self.unanswered += 1
            self.peak_unanswered = max(self.peak_unanswered, self.unanswered)

    def retained(self) -> None:
        with self._lock:
            self.retained_images += 1

    def answered(self) -> None:
        with self._lock:
            self.unanswered -= 1

    def abandoned(self) -> None:
        """A received image given back to the broker unanswered (not acked)."""
        with self._lock:
            self.inflight -= 1
            self.unanswered -= 1

    def finished(self, total_ms: float, *, error: bool, code: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            self.inflight -= 1
            self.processed += 1
            if error:
                self.errors += 1
                key = code or "internal"
                self._errors_by_code[key] = self._errors_by_code.get(key, 0) + 1
            self._done.append((now, total_ms))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()

    def errors_by_code(self) -> dict[str, int]:
        """Error Results since start per error code."""
        with self._lock:
            return dict(self._errors_by_code)

    def snapshot(self) -> tuple[int, int, int, float, Latency]:
        """(processed, errors, inflight, throughput_ips, latency) over the window."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            totals = np.array([t for _, t in self._done], dtype=np.float64)
            processed, errors, inflight = self.processed, self.errors, self.inflight
        if totals.size:
            p50, p95, p99 = (float(v) for v in np.percentile(totals, [50, 95, 99]))
        else:
            p50 = p95 = p99 = 0.0
        return (
            processed,
            errors,
            inflight,
            totals.size / self.window_s,
            Latency(p50=p50, p95=p95, p99=p99),
        )

    def rss_mb(self) -> float:
        return float(self._process.memory_info().rss) / (1024 * 1024)
