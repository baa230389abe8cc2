"""How long the hub's HTTP server takes to answer for a large fleet (not a test).

    python bench/fleet_page.py [--nodes 1000] [--requests 20]

Fills a hub database with N nodes (each with telemetry, a model, tags), a full
hour of telemetry history per node (one sample per 5 s slot: the most the hub
keeps), three models, one active rollout over every node and five finished ones,
then starts the hub's real HTTP server (uvicorn, the same code `cellwatch-hub
serve` runs) on a free loopback port and times, over real HTTP from this process:
the fleet page `/`, its live part `/?fragment=1` (what an open page fetches every
second), a node's page, the rollout's page, `/api/nodes` and `/metrics`. Each is
requested `--requests` times after one warm-up; the figures are wall-clock times
of whole requests (connect, render, transfer), sequential, on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellwatch.hub.config import HttpSettings
from cellwatch.hub.counters import HubCounters
from cellwatch.hub.db import Database
from cellwatch.hub.fetch import FetchServer
from cellwatch.hub.history import SLOT_S, SLOTS, TelemetryHistory
from cellwatch.hub.records import ModelRecord, NodeRecord
from cellwatch.hub.rollout import Rollout
from cellwatch.hub.served import ServedTotals
from cellwatch.hub.store import BundleStore
from cellwatch.hub.targets import NodeView
from cellwatch.hub.web.reader import HubSources
from cellwatch.hub.web.server import HttpServer
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.hubapi import RolloutPolicy
from cellwatch.shared.schemas import Latency, ModelRef, Telemetry
from cellwatch.shared.states import NodeState, RolloutState, UpdateState
from cellwatch.shared.topics import Topics

MODELS = [
    ModelRef(name="all-inception-v3", version=f"1.{i}.0", manifest_sha256=f"{i:064x}")
    for i in range(3)
]
DEPLOYED = {
    "deployed": {
        "n": 240,
        "metrics": {
            name: {"value": 0.9, "ci95": [0.85, 0.94]}
            for name in ("accuracy", "sensitivity", "specificity", "precision", "npv", "roc_auc")
        },
    }
}


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def telemetry(node_id: str, i: int, k: int) -> Telemetry:
    return Telemetry(
        node_id=node_id,
        ts=datetime.now(UTC),
        window_s=10.0,
        processed=1000 + k,
        errors=k % 7,
        errors_by_code={"undecodable_image": k % 7} if k % 7 else {},
        throughput_ips=5.0 + (i + k) % 11,
        latency_ms=Latency(p50=40.0 + k % 5, p95=70.0, p99=90.0 + (i % 13)),
        inflight=k % 4,
        model_version=MODELS[-1].version,
        rss_mb=300.0 + i % 50,
    )


def fill(db: Database, history: TelemetryHistory, nodes: int, now: float) -> None:
    for m in MODELS:
        db.add_model(
            ModelRecord(
                name=m.name,
                version=m.version,
                manifest_sha256=m.manifest_sha256,
                size=47_000_000,
                precision="fp16",
                signer="d7edb49737d4c227",
                metrics=DEPLOYED,
                created_at=datetime.now(UTC).isoformat(),
                pushed_at=now - 3600,
                provenance={"synthetic": True, "base_checkpoint": None},
            )
        )
    ids = [f"node-{i:04d}" for i in range(nodes)]
    for i, node_id in enumerate(ids):
        rec = NodeRecord(
            node_id,
            state=NodeState.ONLINE if i % 50 else NodeState.OFFLINE,
            boot_id=f"{i:032x}",
            since=now - 7200,
            last_seen=now - (i % 9),
            tags=["ward-a" if i % 2 else "ward-b"],
            model=MODELS[-1],
            model_at=now - 3000,
            device="CPU",
        )
        rec.telemetry = telemetry(node_id, i, 0).model_dump(mode="json", by_alias=True)
        db.save_node(rec)
        for k in range(SLOTS):  # a full hour: every slot filled
            history.add(telemetry(node_id, i, k), now - 3600 + (k + 0.5) * SLOT_S)
    views = {n: NodeView(online=True, model=MODELS[0], model_at=now - 5000) for n in ids}
    policy = RolloutPolicy(waves="1,25%,100%", max_failures="5%")
    for r in range(6):
        rollout = Rollout.create(
            db.next_rollout_id(), MODELS[r % 3], "all", ids, views, policy, now - 600 + r
        )
        for t in rollout.targets[: nodes - (nodes // 3 if r == 5 else 0)]:
            t.state = UpdateState.ACTIVE if t.node_id[-1] != "7" else UpdateState.FAILED
            t.progress = 1.0
            if t.state is UpdateState.FAILED:
                t.error_code = UpdateErrorCode.SELF_TEST_FAILED
                t.error_message = "golden mismatch 0.31"
        if r < 5:
            rollout.state, rollout.finished_at = RolloutState.COMPLETED, now - 300 + r
        db.save_rollout(rollout, [f"event {e}" for e in range(20)], now)


def timed(url: str, requests: int) -> tuple[list[float], int]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    opener.open(url, timeout=60).read()  # warm-up
    times, size = [], 0
    for _ in range(requests):
        t0 = time.perf_counter()
        with opener.open(url, timeout=60) as reply:
            size = len(reply.read())
        times.append(time.perf_counter() - t0)
    return times, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cellwatch-bench-") as tmp:
        root = Path(tmp)
        now = time.time()
        db = Database(root / "hub.db")
        history = TelemetryHistory()
        t0 = time.perf_counter()
        fill(db, history, args.nodes, now)
        print(
            f"filled {args.nodes} nodes x {SLOTS} history slots in {time.perf_counter() - t0:.1f} s"
        )
        fetch = FetchServer(BundleStore(root / "store"), Topics(), 262144, HubCounters())
        server = HttpServer(
            HttpSettings(listen="127.0.0.1:0"),
            HubSources(
                db_path=root / "hub.db",
                history=history,
                served=ServedTotals(fetch, db),
                counters=HubCounters(),
                control_depth=lambda: 0,
                control_peak=lambda: 0,
                started_at=datetime.now(UTC),
            ),
        )
        server.start()
        try:
            print(
                f"{args.nodes} nodes, {args.requests} sequential requests each, "
                f"on {cpu_name()} (2 cores, shared):"
            )
            print(f"{'path':<22} {'median s':>9} {'p95 s':>7} {'max s':>7} {'bytes':>10}")
            for path in (
                "/",
                "/?fragment=1",
                "/nodes/node-0001",
                "/rollouts/r6",
                "/api/nodes",
                "/metrics",
            ):
                times, size = timed(server.url + path.lstrip("/"), args.requests)
                times.sort()
                p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                print(
                    f"{path:<22} {statistics.median(times):>9.3f} {p95:>7.3f} "
                    f"{times[-1]:>7.3f} {size:>10,}"
                )
        finally:
            server.stop()
            db.close()


if __name__ == "__main__":
    main()
