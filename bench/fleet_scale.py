"""The hub with a large fleet at steady state (not a test).

    python bench/fleet_scale.py [--nodes 10000] [--duration 600] [--interval 10]
                                [--restarts-per-min 100] [--connections 8]

Starts the project's Mosquitto and a real `cellwatch-hub serve` process (default
settings, HTTP on), brings up `--nodes` SIMULATED, protocol-exact nodes (a swarm:
tests/hub/swarm.py, many node ids over a few connections of a bench-only broker user;
the hub sees the same topics and payloads as from real nodes), each publishing its
retained status, then for `--duration` seconds: every node's Telemetry every
`--interval` seconds (the default `telemetry_interval_s`, spread evenly), and
`--restarts-per-min` node restarts a minute (an `offline` status, as a Will, then
`online` with a new boot_id). Measures:

- the hub process's CPU seconds per second (sampled each second: mean, p95, max) and
  its peak RSS;
- the broker's CPU seconds per second (mean);
- its control queue's depth and peak, and the messages it dropped, by reason
  (/metrics);
- its database's write transactions per second (`cellwatch_hub_database_commits_total`);
- the fleet page `/`, its live fragment and `/metrics`: time per request (median of
  the samples taken every `--probe-every` seconds while the fleet runs);
- `cellwatch-hub nodes` (the table) and `cellwatch-hub nodes --json`: time of the
  whole command, as an operator runs it.

Prints the CPU name and the load average: the swarm, the broker and the hub share the
machine's cores, so the hub's CPU figures are the ones to compare across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_name
from bench.hubproc import BIN, HubProcess
from cellwatch.hub.db import Database
from cellwatch.shared.limits import DEFAULT_TELEMETRY_INTERVAL_S
from cellwatch.shared.schemas import ModelRef
from cellwatch.shared.states import NodeState
from tests.broker import Broker
from tests.harness import quiet_telemetry
from tests.hub.swarm import Swarm, add_swarm_user

MODEL = ModelRef(name="bench", version="1.0.0", manifest_sha256="ab" * 32)
PLACEHOLDER = "node-placeholder"


@dataclass
class Samples:
    cpu: list[float] = field(default_factory=list)
    """Hub CPU seconds per wall second, one per second."""
    rss_peak_mb: float = 0.0
    page_s: list[float] = field(default_factory=list)
    fragment_s: list[float] = field(default_factory=list)
    metrics_s: list[float] = field(default_factory=list)
    depth: list[float] = field(default_factory=list)
    broker_cpu: float = 0.0
    """The broker's CPU seconds per second over the run."""


def known(db_path: Path) -> int:
    db = Database(db_path, readonly=True)
    try:
        return db.node_count()
    finally:
        db.close()


def operator_command(broker: Broker, *args: str) -> float:
    """Seconds `cellwatch-hub ARGS` takes as an operator runs it."""
    conn = ["--host", broker.host, "--port", str(broker.port), "--user", "operator"]
    conn += ["--password-file", str(broker.dir / "secrets" / "operator.password")]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "cellwatch-hub"), *args, *conn, "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cellwatch-hub {' '.join(args)} failed: {proc.stderr.strip()}")
    return took


def probe(hub: HubProcess, s: Samples) -> None:
    took, _ = hub.get("/")
    s.page_s.append(took)
    took, _ = hub.get("/?fragment=1")
    s.fragment_s.append(took)
    took, _ = hub.get("/metrics")
    s.metrics_s.append(took)


def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="cellwatch-bench-fleet-"))
    keys = work / "keys"
    keys.mkdir()
    ids = [f"sim-{i:05d}" for i in range(args.nodes)]
    broker = Broker.create(work / "broker", nodes=())
    add_swarm_user(broker)
    hub = HubProcess(work, broker, keys, http=True, extra=args.hub_extra)
    swarm: Swarm | None = None
    try:
        hub.wait_ready(broker)
        print(
            f"{args.nodes} nodes, telemetry every {args.interval:g} s, "
            f"{args.restarts_per_min:g} restarts a minute, {args.duration:g} s; "
            f"on {cpu_name()}, {os.cpu_count()} cores (load average "
            f"{os.getloadavg()[0]:.1f} at the start)",
            flush=True,
        )
        t0 = time.monotonic()
        swarm = Swarm(broker, ids, model=MODEL, connections=args.connections, answer=False)
        swarm.connect(known=lambda: known(hub.data / "hub.db"), chunk=1000)
        print(
            f"fleet up: the hub knows {args.nodes} nodes after {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        steady(args, broker, hub, swarm)
    finally:
        if swarm is not None:
            swarm.close()
        hub.stop()
        broker.close_clients()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def steady(args: argparse.Namespace, broker: Broker, hub: HubProcess, swarm: Swarm) -> None:
    template = quiet_telemetry(PLACEHOLDER, rss_mb=412.5).to_json().decode()
    n = len(swarm.node_ids)
    rng = random.Random(7)
    s = Samples()
    before = hub.metrics()
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    cpu_then, tick = hub.cpu_s(), start
    assert broker.pid is not None
    mosquitto = psutil.Process(broker.pid)
    broker0 = sum(mosquitto.cpu_times()[:2])
    sent = restarts = 0
    restart_credit = 0.0
    next_probe = start + args.probe_every
    while (now := time.monotonic()) < start + args.duration:
        due = int((now - start) * n / args.interval)
        ts = json.dumps(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        while sent < due:
            node_id = swarm.node_ids[sent % n]
            body = template.replace(PLACEHOLDER, node_id)
            body = body.replace(body.split('"ts":')[1].split(",")[0], ts, 1)
            swarm.telemetry(node_id, body.encode())
            sent += 1
        if now - tick >= 1.0:
            cpu_now = hub.cpu_s()
            s.cpu.append((cpu_now - cpu_then) / (now - tick))
            cpu_then, tick = cpu_now, now
            s.rss_peak_mb = max(s.rss_peak_mb, hub.rss_mb())
            restart_credit += args.restarts_per_min / 60.0
            while restart_credit >= 1.0:
                restart_credit -= 1.0
                node_id = rng.choice(swarm.node_ids)
                swarm.publish_status(node_id, NodeState.OFFLINE)  # its Will
                swarm.boot[node_id] = uuid.uuid4().hex
                swarm.publish_status(node_id, NodeState.ONLINE)
                restarts += 1
        if now >= next_probe:
            probe(hub, s)
            s.depth.append(hub.metrics().get("cellwatch_hub_control_queue_depth", 0.0))
            next_probe = now + args.probe_every
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    s.broker_cpu = (sum(mosquitto.cpu_times()[:2]) - broker0) / elapsed
    after = hub.metrics()
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    nodes_table = operator_command(broker, "nodes")
    nodes_json = operator_command(broker, "nodes", "--json")
    probe(hub, s)
    report(args, s, before, after, elapsed, sent, restarts, nodes_table, nodes_json)
    swarm_cpu = (own1.ru_utime - own0.ru_utime + own1.ru_stime - own0.ru_stime) / elapsed
    print(
        f"(the swarm itself: {swarm_cpu:.2f} CPU s/s; load average {os.getloadavg()[0]:.1f} "
        "at the end)"
    )


def report(
    args: argparse.Namespace,
    s: Samples,
    before: dict[str, float],
    after: dict[str, float],
    elapsed: float,
    sent: int,
    restarts: int,
    nodes_table: float,
    nodes_json: float,
) -> None:
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    drops = {
        k.split("reason=")[1]: v
        for k in after
        if k.startswith("cellwatch_hub_messages_dropped_total") and (v := delta(k)) > 0
    }
    cpu = sorted(s.cpu)
    rows = [
        ("telemetry sent / s", f"{sent / elapsed:.0f} ({restarts} restarts)"),
        (
            "hub CPU s per s: mean / p95 / max",
            f"{statistics.fmean(cpu):.2f} / {cpu[int(0.95 * (len(cpu) - 1))]:.2f} / {cpu[-1]:.2f}",
        ),
        ("hub peak RSS", f"{s.rss_peak_mb:.0f} MB"),
        ("Mosquitto CPU s per s (mean)", f"{s.broker_cpu:.3f}"),
        (
            "control queue: peak (since start) / median depth",
            f"{after.get('cellwatch_hub_control_queue_peak', 0):.0f} / "
            f"{statistics.median(s.depth) if s.depth else 0:.0f}",
        ),
        ("messages dropped", ", ".join(f"{k} {v:.0f}" for k, v in drops.items()) or "none"),
        ("database commits / s", f"{delta('cellwatch_hub_database_commits_total') / elapsed:.0f}"),
        ("fleet page / (median)", f"{statistics.median(s.page_s):.2f} s"),
        ("fleet page live fragment (median)", f"{statistics.median(s.fragment_s):.2f} s"),
        ("/metrics (median)", f"{statistics.median(s.metrics_s):.2f} s"),
        ("cellwatch-hub nodes (table / --json)", f"{nodes_table:.1f} s / {nodes_json:.1f} s"),
    ]
    print()
    print(f"| {args.nodes} nodes, {elapsed:.0f} s | measured |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of steady state")
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_TELEMETRY_INTERVAL_S,
        help="telemetry period, s (the node's default)",
    )
    parser.add_argument("--restarts-per-min", type=float, default=100.0)
    parser.add_argument("--connections", type=int, default=8, help="swarm connections")
    parser.add_argument("--probe-every", type=float, default=30.0, help="page/metrics probes")
    parser.add_argument("--hub-extra", default="", help="lines added to hub.toml (top level)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cellwatch.shared.mqtt").setLevel(logging.ERROR)
    run(args)


if __name__ == "__main__":
    main()
