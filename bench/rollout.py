"""Rollout time and bundle transfer rate through the real broker (not a test).

    python bench/rollout.py [--nodes 1,5,10] [--size-mb 46] [--inception]

Pushes a bundle the size of an fp16 Inception V3 (default: a synthetic one, ~46 MB
of random model.bin, signed like any other; --inception builds the real one with
the training CLI first, which takes minutes), then rolls it out with waves `100%`
to 1, 5 and 10 nodes on this machine through the project's Mosquitto, and prints:
the push time, the time from `rollout start` to `completed`, each fleet's aggregate
rate, the rate to one node next to a plain file copy of the same bytes, and how
the time grows with the node count.

The nodes are SIMULATED: plain MQTT clients (real node users on the real broker)
that download with the node's own Fetcher (cellwatch.node.fetcher: 4 requests in
flight of 256 KiB, each chunk's SHA-256 checked, written to disk and fsynced like
on a node; every file's hash checked at the end) and report
pending/downloading/verifying/activating/active. They skip OpenVINO compilation
and the self-test: the point is the transfer, and 10 real nodes would need
10 OpenVINO instances on 2 cores.
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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Broker, inception_bundle
from cellwatch.hub.client import HubClient
from cellwatch.hub.config import HttpSettings, HubSettings
from cellwatch.hub.service import HubService
from cellwatch.node.fetcher import Fetcher
from cellwatch.shared.bundle import hash_files, write_manifest
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.schemas import (
    DesiredModel,
    ModelRef,
    NodeStatus,
    UpdateReport,
    UpdateState,
    utcnow,
)
from cellwatch.shared.signing import generate_keypair, load_private_key
from cellwatch.shared.topics import Topics

T = Topics()
CHUNK = 256 * 1024
WINDOW = 4
MB = 1e6


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
            state="online",
            boot_id=uuid.uuid4().hex,
            since=utcnow(),
            model=self.model,
        )
        self.mqtt.publish_wait(T.status(self.node_id), s.to_json(), qos=1, retain=True)

    def on_message(self, msg: paho.MQTTMessage) -> None:
        if msg.topic == T.desired(self.node_id):
            if not msg.payload:
                return
            d = DesiredModel.model_validate_json(msg.payload)
            if d.model.manifest_sha256 != self.model.sha256:
                threading.Thread(target=self.update, args=(d,), daemon=True).start()
            return
        self.fetcher.on_reply(msg)

    def report(self, d: DesiredModel, state: UpdateState, progress: float) -> None:
        r = UpdateReport(
            rollout_id=d.rollout_id, model=d.model, state=state, progress=progress, ts=utcnow()
        )
        self.mqtt.publish(T.update(self.node_id), r.to_json(), qos=1)

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
        self.model = ModelRef(name=d.model.name, version=d.model.version, sha256=sha)
        self.status()
        self.report(d, UpdateState.ACTIVE, 1)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.fetcher.close()


def run(counts: list[int], size_mb: float, inception: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="cellwatch-bench-rollout-"))
    keys = work / "keys"
    if inception:
        print("building an fp16 Inception V3 bundle with the training CLI ...", flush=True)
        target, keys = inception_bundle(work / "inception", "fp16")
    else:
        target = synthetic_bundle(work / "v2", keys, size_mb, "2.0.0")
    size = sum(p.stat().st_size for p in target.iterdir())
    kind = "Inception V3" if inception else "synthetic"
    print(f"bundle: {target.name}, {size / MB:.1f} MB ({kind})")

    copy_to = work / "copy.bin"
    t0 = time.monotonic()
    for p in target.iterdir():
        shutil.copyfile(p, copy_to)
    copy_s = time.monotonic() - t0
    print(f"plain file copy (warm cache): {copy_s:.3f} s, {size / MB / copy_s:.0f} MB/s")

    nodes = [f"node-{i}" for i in range(1, max(counts) + 1)]
    broker = Broker.create(work / "broker", nodes=nodes)
    settings = HubSettings(
        mqtt=broker.settings("hub"),
        data_dir=work / "hub",
        trusted_keys=keys,
        tick_s=0.05,
        http=HttpSettings(enabled=False),
    )
    hub = HubService(settings)
    hub.start()
    op = HubClient(broker.settings("operator"), timeout_s=60)
    op.connect()
    t0 = time.monotonic()
    pushed = op.push(target)
    push_s = time.monotonic() - t0
    print(
        f"push (operator -> hub, verified, stored): {push_s:.2f} s, {size / MB / push_s:.0f} MB/s"
    )
    name, version = pushed.model["name"], pushed.model["version"]
    old = ModelRef(name=name, version="0", sha256="0" * 64)

    rows = []
    for n in counts:
        sims = [SimNode(broker, node_id, old, work / "sim" / node_id) for node_id in nodes[:n]]
        deadline = time.monotonic() + 30
        while len([x for x in op.nodes().nodes if x.state == "online"]) < n:
            assert time.monotonic() < deadline, "nodes not seen"
            time.sleep(0.05)
        t0 = time.monotonic()
        rid = op.rollout_start(
            RolloutStartArgs(
                name=name,
                version=version,
                target=f"node:{','.join(nodes[:n])}",
                waves="100%",
                yes_untrained=True,  # the bench's bundles are fakes or untrained on purpose
            )
        ).rollout_id
        while op.rollout_status(rid).state != "completed":
            time.sleep(0.05)
        total_s = time.monotonic() - t0
        per_node = [s.download_s for s in sims]
        rows.append(
            (
                n,
                total_s,
                n * size / MB / total_s,
                size / MB / max(per_node),
                size / MB / min(per_node),
            )
        )
        for s in sims:
            s.close()
        cleaner = broker.connect("hub")  # clear the retained desired for the next round
        for node_id in nodes[:n]:
            cleaner.publish_wait(T.desired(node_id), b"", qos=1, retain=True)
    op.close()
    hub.stop()
    hub.join()
    broker.close_clients()
    broker.stop()

    print()
    head = ("nodes", "rollout s", "aggregate MB/s", "slowest node MB/s", "fastest node MB/s")
    print("  ".join(f"{h:>17}" for h in head) + f"  {'time vs 1 node':>15}")
    for n, total_s, agg, slow, fast in rows:
        cells = (f"{n}", f"{total_s:.2f}", f"{agg:.1f}", f"{slow:.1f}", f"{fast:.1f}")
        print("  ".join(f"{c:>17}" for c in cells) + f"  {total_s / rows[0][1]:>14.2f}x")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", default="1,5,10", help="fleet sizes, e.g. 1,5,10")
    parser.add_argument("--size-mb", type=float, default=46.0, help="synthetic model.bin size")
    parser.add_argument("--inception", action="store_true", help="real fp16 Inception V3 bundle")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run([int(x) for x in args.nodes.split(",")], args.size_mb, args.inception)


if __name__ == "__main__":
    main()
