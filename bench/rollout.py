"""Rollout time and bundle transfer rate through the real broker (not a test).

    python bench/rollout.py [--nodes 1,5,10] [--downloaders 10] [--size-mb 46] [--inception]
    python bench/rollout.py --nodes 10,100,1000,2000

Pushes a bundle the size of an fp16 Inception V3 (default: a synthetic one, ~46 MB
of random model.bin, signed like any other; --inception builds the real one with
the training CLI first, which takes minutes), then, for each fleet size N of
--nodes, rolls it out with waves `100%` to N nodes on this machine through the
project's Mosquitto and a real hub process (`cellwatch-hub serve`, default
settings), and prints: the push time, the time from `rollout start` to `completed`,
the aggregate rate and the rate to one downloading node (next to a plain file copy
of the same bytes), the hub process's peak RSS and CPU seconds during the rollout,
the bytes the broker process read and wrote (its /proc I/O counters), and how the
time grows with N.

The nodes are SIMULATED, protocol-exact, without OpenVINO compilation or self-test
(N real nodes would need N OpenVINO instances on 2 cores):
- the first `--downloaders` (10) are MQTT clients of their own (real node users)
  that download with the node's own Fetcher (cellwatch.node.fetcher: 4 requests in
  flight of 256 KiB, each chunk's SHA-256 checked, written to disk and fsynced like
  on a node; every file's hash checked at the end) and report
  pending/downloading/verifying/activating/active;
- the others are a swarm (tests/hub/swarm.py: many node ids over 4 connections of a
  bench-only broker user) answering like nodes whose store already holds the bundle
  (pending/verifying/activating, new status, active): the hub's side of 2,000 nodes
  without moving 2,000 copies of 46 MB through one machine's broker (that would take
  N x the 10-node time per 10 nodes; the rate per downloading node is measured).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Broker, cpu_name, inception_bundle
from bench.hubproc import MB, HubProcess
from cellwatch.hub.client import HubClient
from cellwatch.hub.db import Database
from cellwatch.node.fetcher import Fetcher
from cellwatch.shared.bundle import hash_files, write_manifest
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from cellwatch.shared.mqtt import Message, MqttClient
from cellwatch.shared.schemas import DesiredModel, ModelRef, NodeStatus, UpdateReport, utcnow
from cellwatch.shared.signing import generate_keypair, load_private_key
from cellwatch.shared.states import NodeState, RolloutState, UpdateState
from cellwatch.shared.topics import Topics
from tests.hub.swarm import Swarm, add_swarm_user

T = Topics()
CHUNK = 256 * 1024
WINDOW = 4


def synthetic_bundle(out: Path, keys: Path, size_mb: float, version: str) -> Path:
    out.mkdir(parents=True)
    rng = np.random.default_rng(int(version.split(".")[0]))
    (out / "model.xml").write_text("<net name='synthetic'/>\n" * 2000)
    (out / "model.bin").write_bytes(rng.bytes(int(size_mb * MB)))
    (out / "golden.npz").write_bytes(rng.bytes(200_000))
    manifest = Manifest(
        name="bench-synthetic",
        version=version,
        created_at=datetime.now(UTC),
        labels=["normal", "ALL"],
        output="probabilities",
        precision="fp16",
        files=hash_files(out),
        provenance={"synthetic": True, "builder": "bench/rollout.py"},
    )
    if not (keys / "bench.key").exists():
        generate_keypair(keys, "bench")
    write_manifest(out, manifest, load_private_key(keys / "bench.key"))
    return out


class SimNode:
    """A simulated node: the node's own Fetcher downloads the desired bundle; status
    and update reports as the node sends them; no compilation, no self-test."""

    def __init__(self, broker: Broker, node_id: str, model: ModelRef, scratch: Path) -> None:
        self.node_id = node_id
        self.model = model
        self.scratch = scratch
        self.download_s = 0.0
        self._lock = threading.Lock()
        self._updating: str | None = None
        """The bundle an update thread is working on: one at a time, and a desired
        message the broker delivers again meanwhile starts no second one."""
        self.mqtt = MqttClient(
            broker.settings(node_id),
            client_id=f"sim-{node_id}",
            clean_start=True,
            subscriptions=[(T.desired(node_id), 1), (T.fetch_reply(node_id), 1)],
        )
        self.fetcher = Fetcher(self.mqtt, T, node_id, window=WINDOW, chunk_bytes=CHUNK)
        self.mqtt.set_message_handler(self.on_message)
        self.mqtt.connect()
        self.status()

    @property
    def bytes(self) -> int:
        return self.fetcher.bytes_received

    def status(self) -> None:
        s = NodeStatus(
            node_id=self.node_id,
            state=NodeState.ONLINE,
            boot_id=uuid.uuid4().hex,
            since=utcnow(),
            model=self.model,
        )
        self.mqtt.publish_wait(T.status(self.node_id), s.to_json(), qos=1, retain=True)

    def on_message(self, msg: Message) -> None:
        if msg.topic == T.desired(self.node_id):
            if not msg.payload:
                return
            d = DesiredModel.model_validate_json(msg.payload)
            sha = d.model.manifest_sha256
            with self._lock:  # the check and the claim are one step
                if sha == self.model.manifest_sha256 or self._updating is not None:
                    return
                self._updating = sha
            threading.Thread(target=self._update_once, args=(d,), daemon=True).start()
            return
        self.fetcher.rpc.on_message(msg)

    def report(self, d: DesiredModel, state: UpdateState, progress: float) -> None:
        r = UpdateReport(
            rollout_id=d.rollout_id, model=d.model, state=state, progress=progress, ts=utcnow()
        )
        self.mqtt.publish(T.update(self.node_id), r.to_json(), qos=1)

    def _update_once(self, d: DesiredModel) -> None:
        try:
            self.update(d)
        finally:
            with self._lock:
                self._updating = None

    def update(self, d: DesiredModel) -> None:
        sha = d.model.manifest_sha256
        self.report(d, UpdateState.PENDING, 0)
        self.report(d, UpdateState.DOWNLOADING, 0)
        staging = self.scratch / sha
        staging.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        for name in (MANIFEST_FILE, SIGNATURE_FILE):
            self.fetcher.fetch(sha, name, staging / name)
        manifest = Manifest.model_validate_json((staging / MANIFEST_FILE).read_bytes())
        for name, entry in manifest.files.items():
            self.fetcher.fetch(sha, name, staging / name, expected_size=entry.size)
        self.download_s = time.monotonic() - t0
        for name, entry in manifest.files.items():
            assert hashlib.sha256((staging / name).read_bytes()).hexdigest() == entry.sha256
        shutil.rmtree(staging)
        self.report(d, UpdateState.VERIFYING, 1)
        self.report(d, UpdateState.ACTIVATING, 1)
        self.model = ModelRef(name=d.model.name, version=d.model.version, manifest_sha256=sha)
        self.status()
        self.report(d, UpdateState.ACTIVE, 1)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.fetcher.close()


@dataclass
class Row:
    nodes: int
    downloaders: int
    total_s: float
    aggregate_mb_s: float
    slowest_mb_s: float
    hub_rss_mb: float
    hub_cpu_s: float
    broker_read_mb: float
    broker_written_mb: float


def broker_io(broker: Broker) -> tuple[int, int]:
    assert broker.pid is not None
    io = psutil.Process(broker.pid).io_counters()
    return io.read_chars, io.write_chars  # Linux: bytes through read/write syscalls


def wait_completed(db_path: Path, rid: str, hub: HubProcess, peak: list[float]) -> None:
    """Poll the hub's database read-only (no load on the hub) until rid completed."""
    db = Database(db_path, readonly=True)
    try:
        while True:
            peak[0] = max(peak[0], hub.rss_mb())
            r = db.rollout(rid)
            if r is not None and r.state is RolloutState.COMPLETED:
                return
            assert r is None or r.active, f"rollout {rid} ended {r.state}: {r.reason}"
            time.sleep(0.1)
    finally:
        db.close()


def online(db_path: Path) -> int:
    db = Database(db_path, readonly=True)
    try:
        return sum(1 for n in db.nodes() if n.state is NodeState.ONLINE)
    finally:
        db.close()


def rounds(
    work: Path,
    broker: Broker,
    hub: HubProcess,
    target: Path,
    size: int,
    counts: list[int],
    nodes: list[str],
    downloaders: int,
) -> list[Row]:
    op = HubClient(broker.settings("operator"), timeout_s=60)
    op.connect()
    t0 = time.monotonic()
    pushed = op.push(target)
    push_s = time.monotonic() - t0
    print(
        f"push (operator -> hub, verified, stored): {push_s:.2f} s, {size / MB / push_s:.0f} MB/s"
    )
    name, version = pushed.model["name"], pushed.model["version"]
    old = ModelRef(name=name, version="0", manifest_sha256="0" * 64)
    db_path = hub.data / "hub.db"
    rows = []
    for n in counts:
        d = min(n, downloaders)
        sims = [SimNode(broker, node_id, old, work / "sim" / node_id) for node_id in nodes[:d]]
        swarm = Swarm(broker, [f"sim-{i:05d}" for i in range(n - d)], model=old) if n > d else None
        if swarm is not None:
            swarm.connect()
        deadline = time.monotonic() + 300
        while online(db_path) < n:
            assert time.monotonic() < deadline, "nodes not seen"
            time.sleep(0.5)
        ids = nodes[:d] + (swarm.node_ids if swarm is not None else [])
        io0, cpu0, peak = broker_io(broker), hub.cpu_s(), [hub.rss_mb()]
        t0 = time.monotonic()
        # Fleets grow from one round to the next (the same ids and more): `all` is
        # this round's nodes.
        rid = op.rollout_start(
            RolloutStartArgs(
                name=name,
                version=version,
                target="all",
                waves="100%",
                yes_untrained=True,  # the bench's bundles are fakes or untrained on purpose
            )
        ).rollout_id
        wait_completed(db_path, rid, hub, peak)
        total_s = time.monotonic() - t0
        io1, cpu1 = broker_io(broker), hub.cpu_s()
        slowest = max(s.download_s for s in sims)
        rows.append(
            Row(
                nodes=n,
                downloaders=d,
                total_s=total_s,
                aggregate_mb_s=d * size / MB / total_s,
                slowest_mb_s=size / MB / slowest,
                hub_rss_mb=peak[0],
                hub_cpu_s=cpu1 - cpu0,
                broker_read_mb=(io1[0] - io0[0]) / MB,
                broker_written_mb=(io1[1] - io0[1]) / MB,
            )
        )
        print(f"  {n} nodes: {total_s:.2f} s", flush=True)
        for s in sims:
            s.close()
        if swarm is not None:
            swarm.close()
        cleaner = broker.connect("hub")  # clear the retained desired for the next round
        for node_id in ids:
            cleaner.publish(T.desired(node_id), b"", qos=1, retain=True)
        cleaner.publish_wait(T.desired(ids[-1]), b"", qos=1, retain=True)
    op.close()
    return rows


def run(
    counts: list[int], downloaders: int, size_mb: float, inception: bool, hub_extra: str = ""
) -> None:
    work = Path(tempfile.mkdtemp(prefix="cellwatch-bench-rollout-"))
    keys = work / "keys"
    if inception:
        print("building an fp16 Inception V3 bundle with the training CLI ...", flush=True)
        target, keys = inception_bundle(work / "inception", "fp16")
    else:
        target = synthetic_bundle(work / "v2", keys, size_mb, "2.0.0")
    size = sum(p.stat().st_size for p in target.iterdir())
    kind = "Inception V3" if inception else "synthetic"
    print(f"bundle: {target.name}, {size / MB:.1f} MB ({kind}); on {cpu_name()}, 2 cores, shared")

    copy_to = work / "copy.bin"
    t0 = time.monotonic()
    for p in target.iterdir():
        shutil.copyfile(p, copy_to)
    copy_s = time.monotonic() - t0
    print(f"plain file copy (warm cache): {copy_s:.3f} s, {size / MB / copy_s:.0f} MB/s")

    nodes = [f"node-{i}" for i in range(1, min(max(counts), downloaders) + 1)]
    broker = Broker.create(work / "broker", nodes=nodes)
    add_swarm_user(broker)
    hub = HubProcess(work, broker, keys, extra=hub_extra)
    try:  # whatever happens, no hub or broker process outlives the benchmark
        hub.wait_ready(broker)
        rows = rounds(work, broker, hub, target, size, counts, nodes, downloaders)
    finally:
        hub.stop()
        broker.close_clients()
        broker.stop()

    print()
    head = (
        "nodes",
        "downloading",
        "rollout s",
        "aggregate MB/s",
        "slowest node MB/s",
        "hub peak RSS MB",
        "hub CPU s",
        "broker in MB",
        "broker out MB",
        "time vs first",
    )
    print("  ".join(f"{h:>17}" for h in head))
    for r in rows:
        cells = (
            f"{r.nodes}",
            f"{r.downloaders}",
            f"{r.total_s:.2f}",
            f"{r.aggregate_mb_s:.1f}",
            f"{r.slowest_mb_s:.1f}",
            f"{r.hub_rss_mb:.0f}",
            f"{r.hub_cpu_s:.1f}",
            f"{r.broker_read_mb:.0f}",
            f"{r.broker_written_mb:.0f}",
            f"{r.total_s / rows[0].total_s:.2f}x",
        )
        print("  ".join(f"{c:>17}" for c in cells))
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", default="1,5,10", help="fleet sizes, e.g. 1,5,10 or 2000")
    parser.add_argument(
        "--downloaders",
        type=int,
        default=10,
        help="nodes per fleet that download the bundle (the others: a swarm, see above)",
    )
    parser.add_argument("--size-mb", type=float, default=46.0, help="synthetic model.bin size")
    parser.add_argument("--inception", action="store_true", help="real fp16 Inception V3 bundle")
    parser.add_argument(
        "--hub-extra",
        default="",
        help="lines added to hub.toml, e.g. $'[limits]\\nreceive_maximum = 65535\\n' (the "
        "hub's receive_maximum should be 5 x the fleet: the default 16384 is below it "
        "at 10,000 nodes)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The swarm's "subscriptions are live" probe is a publish the broker refuses.
    logging.getLogger("cellwatch.shared.mqtt").setLevel(logging.ERROR)
    counts = sorted(int(x) for x in args.nodes.split(","))
    run(counts, args.downloaders, args.size_mb, args.inception, args.hub_extra)


if __name__ == "__main__":
    main()
