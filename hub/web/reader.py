"""What the HTTP server reads, and how: the hub database through a read-only
connection of its own (SQLite WAL: the control thread's writes never wait for it),
plus thread-safe snapshots of the hub's in-memory state (telemetry history, bytes
served, drop counters, control-queue depth). Nothing here changes the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cellwatch.hub.counters import HubCounters
from cellwatch.hub.db import Database
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.history import TelemetryHistory
from cellwatch.hub.queries import Queries
from cellwatch.hub.served import ServedTotals
from cellwatch.hub.sites import Sites


@dataclass(frozen=True)
class HubSources:
    """The parts of a running hub the HTTP server may read."""

    db_path: Path
    history: TelemetryHistory
    served: ServedTotals
    counters: HubCounters
    control_depth: Callable[[], int]
    control_peak: Callable[[], int]
    started_at: datetime
    sites: Sites = field(default_factory=Sites)
    db_commits: Callable[[], int] = lambda: 0


class FleetReader:
    def __init__(self, sources: HubSources) -> None:
        self.sources = sources
        self.db = Database(sources.db_path, readonly=True)
        self.queries = Queries(
            self.db,
            Fleet(self.db, sources.history, sites=sources.sites),
            sources.served,
            sources.started_at,
        )

    @property
    def history(self) -> TelemetryHistory:
        return self.sources.history

    def close(self) -> None:
        self.db.close()
