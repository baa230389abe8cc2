"""Bundle bytes served per node and bundle, across hub restarts.

The fetch server (hub/fetch.py) counts what this process sent; the database keeps the
totals (table `served`). `ServedTotals` answers with both: the totals stored when the
hub started plus what the fetch server counted since. The control thread stores them
every tick in which they changed and at shutdown, so a crash loses at most one tick.
Fetch requests and errors stay per process (they describe this process's health).
"""

from __future__ import annotations

import threading
from collections import defaultdict

from cellwatch.hub.db import Database
from cellwatch.hub.fetch import FetchServer, Served, by_bundle, by_node


class ServedTotals:
    def __init__(self, fetch: FetchServer, db: Database) -> None:
        self.fetch = fetch
        self._base = db.served()
        self._lock = threading.Lock()
        self._stored = {node: dict(per) for node, per in self._base.items()}

    @property
    def requests(self) -> int:
        return self.fetch.requests

    @property
    def errors(self) -> int:
        return self.fetch.errors

    def served(self) -> Served:
        """Bytes sent: node_id -> manifest sha256 -> bytes."""
        out: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        for source in (self._base, self.fetch.served()):
            for node, per in source.items():
                for sha, n in per.items():
                    out[node][sha] += n
        return {node: dict(per) for node, per in out.items()}

    def served_by_node(self) -> dict[str, int]:
        return by_node(self.served())

    def served_by_bundle(self) -> dict[str, int]:
        return by_bundle(self.served())

    def store(self, db: Database) -> None:
        """Store the totals that changed since the last call (control thread)."""
        with self._lock:
            now = self.served()
            changed = {
                node: {sha: n for sha, n in per.items() if self._stored.get(node, {}).get(sha) != n}
                for node, per in now.items()
            }
            changed = {node: per for node, per in changed.items() if per}
            if changed:
                db.save_served(changed)
                self._stored = now
