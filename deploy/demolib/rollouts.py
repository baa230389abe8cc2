"""Steps 4 and 7b: a rollout started with `cellwatch-hub rollout start`, followed with
`rollout status --watch` and the hub's view of each node until every node serves the
new version."""

from __future__ import annotations

import time

from demolib.common import MODEL_NAME, NODES, ROLLOUT_TIMEOUT_S, DemoError, doing, done, shown
from demolib.hubctl import FleetView, Hub
from demolib.lab import Traffic
from demolib.processes import ProcessGroup
from demolib.results import versions_text

POLL_S = 0.2
PROGRESS_EVERY_S = 3.0


def roll_out(
    hub: Hub,
    fleet: FleetView,
    group: ProcessGroup,
    version: str,
    waves: str,
    traffic: Traffic | None,
) -> float:
    """Start a rollout (a canary node first, then the rest), follow it until every node
    serves version and the hub calls it completed. Returns the time.monotonic() at
    which the last node switched."""
    rollout_id = hub.rollout(version, waves, confirm_untrained=True)
    watch = hub.watch(rollout_id)
    switched_at = follow(fleet, group, version, traffic)
    group.finish(watch, timeout=ROLLOUT_TIMEOUT_S)
    return switched_at


def follow(fleet: FleetView, group: ProcessGroup, version: str, traffic: Traffic | None) -> float:
    """Print each node's switch (and the traffic's counts) until all serve version."""
    start = time.monotonic()
    seen = fleet.serving()
    last_print = start
    while True:
        group.check()
        now = time.monotonic()
        serving = fleet.serving()
        for n in NODES:
            v = serving.get(n)
            if v != seen.get(n):
                seen[n] = v
                done(f"{n} now serves {MODEL_NAME} {v} ({now - start:.1f} s after the start)")
        if all(seen.get(n) == version for n in NODES):
            return now
        if traffic is not None and now - last_print >= PROGRESS_EVERY_S:
            last_print = now
            t = traffic.snapshot()
            doing(
                f"images sent {t.sent}, answered {t.answered} {versions_text(t.by_version)}, "
                f"failed {t.failed}"
            )
        if now - start > ROLLOUT_TIMEOUT_S:
            state = ", ".join(f"{n}: {seen.get(n) or 'no model'}" for n in NODES)
            raise DemoError(
                f"the nodes did not all serve {version} within {ROLLOUT_TIMEOUT_S:g} s "
                f"({state}); see {shown(fleet.layout.logs)}/"
            )
        time.sleep(POLL_S)
