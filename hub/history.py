"""Telemetry history for the fleet page's sparklines and label shares: the last hour of
each node, in memory (a restarted hub starts with empty sparklines).

Bounded: each node has a ring of SLOTS slots of SLOT_S seconds (an hour). A sample
arriving in the slot of the previous one is averaged into it, so a node reporting
every 0.5 s costs no more than one reporting every 10 s. The control thread adds
samples; readers (the HTTP server) take copies; the lock is held for a few array
operations only.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cellwatch.shared.schemas import Telemetry

HISTORY_S = 3600.0
SLOT_S = 5.0
SLOTS = int(HISTORY_S / SLOT_S)
SERIES = ("throughput_ips", "p50_ms", "p99_ms", "inflight", "rss_mb")
"""The columns of `Samples.values`, in order."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Samples:
    """One node's history, oldest first: ts (seconds since the epoch, one per slot)
    and values (one row per slot, one column per SERIES)."""

    ts: FloatArray
    values: FloatArray

    def series(self, name: str) -> FloatArray:
        return self.values[:, SERIES.index(name)]

    def __len__(self) -> int:
        return len(self.ts)


class _Ring:
    __slots__ = ("count", "n", "slot", "ts", "values")

    def __init__(self) -> None:
        self.ts = np.zeros(SLOTS, dtype=np.float64)
        self.values = np.zeros((SLOTS, len(SERIES)), dtype=np.float64)
        self.count = np.zeros(SLOTS, dtype=np.int64)
        self.n = 0
        """Slots ever filled (the newest is at (n - 1) % SLOTS)."""
        self.slot = -1
        """Slot number (ts // SLOT_S) of the newest slot."""

    def add(self, ts: float, row: FloatArray) -> None:
        slot = int(ts // SLOT_S)
        if self.n and slot <= self.slot:  # same slot (or a clock step back): average in
            i = (self.n - 1) % SLOTS
            self.count[i] += 1
            self.values[i] += (row - self.values[i]) / self.count[i]
            self.ts[i] = max(self.ts[i], ts)
            return
        i = self.n % SLOTS
        self.ts[i], self.values[i], self.count[i] = ts, row, 1
        self.n += 1
        self.slot = slot

    def copy(self, since: float) -> Samples:
        size = min(self.n, SLOTS)
        order = (np.arange(self.n - size, self.n)) % SLOTS
        keep = order[self.ts[order] >= since]
        return Samples(self.ts[keep].copy(), self.values[keep].copy())


class TelemetryHistory:
    """Per-node rings; thread-safe. Besides the SERIES, the node's since-start label
    counts (drift figures) at most once per slot, for the label shares of the last hour."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rings: dict[str, _Ring] = {}
        self._labels: dict[str, deque[tuple[float, dict[str, int]]]] = {}

    def add(self, t: Telemetry, now: float) -> None:
        row = np.array(
            [t.throughput_ips, t.latency_ms.p50, t.latency_ms.p99, t.inflight, t.rss_mb],
            dtype=np.float64,
        )
        with self._lock:
            ring = self._rings.get(t.node_id)
            if ring is None:
                ring = self._rings[t.node_id] = _Ring()
            ring.add(now, row)
            if t.drift is not None:
                seen = self._labels.setdefault(t.node_id, deque(maxlen=SLOTS + 1))
                if seen and int(seen[-1][0] // SLOT_S) >= int(now // SLOT_S):
                    seen.pop()  # one per slot: the newest counts
                seen.append((now, dict(t.drift.total_labels)))

    def label_shares(self, node_id: str, now: float) -> dict[str, float] | None:
        """Shares of the labels the node gave over the last hour (None: no image), from
        the growth of its since-start counts (a restart within the hour counts from 0)."""
        with self._lock:
            seen = list(self._labels.get(node_id, ()))
        if len(seen) < 2:
            return None
        since = now - HISTORY_S
        older = [i for i, (ts, _) in enumerate(seen) if ts <= since]
        start = older[-1] if older else 0
        base = seen[start][1]
        for (_, before), (_, after) in zip(seen[start:], seen[start + 1 :], strict=False):
            if sum(after.values()) < sum(before.values()):
                base = {}  # the node restarted: its counts began again at 0
        newest = seen[-1][1]
        grown = {k: max(0, v - base.get(k, 0)) for k, v in newest.items()}
        total = sum(grown.values())
        if total == 0:
            return None
        return {k: round(v / total, 4) for k, v in sorted(grown.items()) if v}

    def samples(self, node_id: str, now: float) -> Samples:
        """The node's last hour (empty if none)."""
        with self._lock:
            ring = self._rings.get(node_id)
            if ring is not None:
                return ring.copy(now - HISTORY_S)
        return Samples(np.zeros(0), np.zeros((0, len(SERIES))))

    def all_samples(self, now: float) -> dict[str, Samples]:
        """Every node's last hour; the lock is taken per node (short holds)."""
        with self._lock:
            rings = list(self._rings.items())
        out = {}
        for node, ring in rings:
            with self._lock:
                out[node] = ring.copy(now - HISTORY_S)
        return out
