"""What a batch came to: counts per label and error code, round trips, retries."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from cellwatch.client.answer import Answer
from cellwatch.shared.rpc import RpcStats


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = min(max(1, math.ceil(q / 100 * len(ordered))), len(ordered))
    return ordered[rank - 1]


@dataclass
class Summary:
    labels: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    """Error Result codes and client error codes (timeout, payload_too_large ...)."""
    round_trips_s: list[float] = field(default_factory=list)
    retried: int = 0
    """Images that needed more than one publish."""
    total: int = 0
    ok: int = 0

    def add(self, answer: Answer) -> None:
        self.total += 1
        if answer.round_trip_s is not None:
            self.round_trips_s.append(answer.round_trip_s)
        if answer.attempts > 1:
            self.retried += 1
        if answer.ok and answer.result is not None:
            self.ok += 1
            self.labels[answer.result.label or "?"] += 1
        else:
            self.errors[answer.status] += 1

    @property
    def failed(self) -> int:
        return self.total - self.ok

    def lines(self, stats: RpcStats) -> list[str]:
        """The summary as text lines (numbers say their sample size)."""
        out = [f"{self.total} images: {self.ok} ok, {self.failed} without an ok Result"]
        if self.labels:
            out.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        if self.errors:
            out.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())))
        if self.round_trips_s:
            n = len(self.round_trips_s)
            p50 = percentile(self.round_trips_s, 50) * 1000
            p99 = percentile(self.round_trips_s, 99) * 1000
            out.append(f"round trip: p50 {p50:.1f} ms, p99 {p99:.1f} ms (n={n}, publish to Result)")
        out.append(
            f"publishes: {stats.sent} ({stats.retries} retries for {self.retried} images); "
            f"dropped: {stats.duplicates} duplicates, {stats.late} late, "
            f"{stats.unknown} unknown, {stats.malformed} malformed"
        )
        return out
