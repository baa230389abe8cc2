"""The hub's own event counters (what /metrics exports as cellwatch_hub_*_total).

Incremented from any thread, the MQTT network thread included: each call holds a
lock for one dict update and never waits on anything else.
"""

from __future__ import annotations

import threading
from enum import StrEnum


class DropReason(StrEnum):
    """Why the hub dropped an incoming message (label `reason`)."""

    FETCH_QUEUE_FULL = "fetch_queue_full"
    """A fetch request arrived while the fetch queue was full (the node asks again)."""
    MALFORMED = "malformed"
    """A status, telemetry or update report that did not validate (absurd values too)."""
    WRONG_NODE = "wrong_node"
    """A message naming another node than its topic."""
    TOO_LARGE = "too_large"
    """A message over its topic's size cap (hub/intake.py), dropped unread."""
    RATE_LIMITED = "rate_limited"
    """Telemetry of a node sending more than `limits.telemetry_per_s` (dropped), or a
    status beyond `limits.status_per_s` (held back: the latest is applied later)."""
    BACKLOG = "backlog"
    """Telemetry arriving while the control queue is above `limits.telemetry_high_water`."""
    SUPERSEDED = "superseded"
    """A node status or telemetry replaced by a newer one of the same node before it
    was handled."""
    DATABASE = "database"
    """Telemetry that came while the database was not writable (hub/control.py)."""
    TOO_MANY_NODES = "too_many_nodes"
    """A message of a node id beyond `limits.max_nodes`."""
    HANDLING_FAILED = "handling_failed"
    """A message whose handling kept failing (e.g. the database) after the retries."""
    UNKNOWN_ROLLOUT = "unknown_rollout"
    """A shadow report for a rollout the hub does not have, or one without a shadow phase."""
    NOT_A_TARGET = "not_a_target"
    """A shadow report from a node outside the rollout's targets (or of another model)."""
    PHASE_OVER = "phase_over"
    """A shadow window that arrived after its phase ended (not counted: the evidence is
    what the decision saw)."""
    DUPLICATE_WINDOW = "duplicate_window"
    """A shadow window the hub had stored already (counted once; the report's state is
    taken)."""


class HubCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {}

    def dropped(self, reason: DropReason | str, n: int = 1) -> None:
        """Count n messages dropped for reason (another part may add its own reasons)."""
        with self._lock:
            self._dropped[str(reason)] = self._dropped.get(str(reason), 0) + n

    def dropped_by_reason(self) -> dict[str, int]:
        """Every reason this hub knows (zero if none yet) and the count since start."""
        with self._lock:
            counts = dict(self._dropped)
        return {**{str(r): 0 for r in DropReason}, **counts}
