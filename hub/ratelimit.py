"""Per-node rate limits of what the fleet sends the hub, and the warning they log.

`RateLimiter`: token buckets per node id (a rate per second and a burst). `FloodLog`:
what a node sent beyond its rate, logged as one warning per node per interval (a
node flooding 20,000 statuses is one line a minute, not 20,000). Both keep at most
`max_keys` nodes (the most recent), and are called from the MQTT network thread and the
control thread: each call holds a lock for a few dict operations, never waits.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict

log = logging.getLogger(__name__)

FLOOD_WARN_INTERVAL_S = 60.0
"""At most one warning per node this often about what it sent beyond its rate."""


class RateLimiter:
    """Token buckets per key (rate per second, burst), the `max_keys` most recent."""

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        """Take a token of key's bucket if it has one."""
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return allowed


class FloodLog:
    """Counts, per node, the messages over its rate; one warning per node per
    `interval_s` says how many of each kind there were since the last one."""

    def __init__(self, max_keys: int, interval_s: float = FLOOD_WARN_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._counts: OrderedDict[str, Counter[str]] = OrderedDict()
        self._logged: dict[str, float] = {}
        """node id -> when its last warning was logged."""

    def note(self, node_id: str, what: str, now: float) -> None:
        """One message of node_id over its rate (`what`: e.g. "statuses held back")."""
        with self._lock:
            counts = self._counts.pop(node_id, None) or Counter()
            counts[what] += 1
            self._counts[node_id] = counts
            while len(self._counts) > self.max_keys:
                gone, _ = self._counts.popitem(last=False)
                self._logged.pop(gone, None)
            last = self._logged.get(node_id)
            if last is not None and now - last < self.interval_s:
                return
            self._logged[node_id] = now
            summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
            counts.clear()
            since = "so far" if last is None else f"in the last {now - last:.0f} s"
        log.warning(
            "node %s: sends faster than the hub's limits allow (limits.status_per_s, "
            "telemetry_per_s): %s %s; counted rate_limited, one warning per %.0f s",
            node_id,
            summary,
            since,
            self.interval_s,
        )
