"""How long a node takes to come back: the figure behind the nodes' session expiry.

    python bench/node_startup.py [--bundle DIR --trusted-keys DIR]... [--runs 5]

For each bundle (default: the toy test model), starts `cellwatch-node run` against the
project's Mosquitto `--runs` times and measures the time from the process start to
its retained `online` status (load, verify, compile, self-test, connect). A node
that dies is back after systemd's RestartSec (5 s in the unit) plus this; its
session must outlive that for the images queued in it to be answered by the node
itself, and should not outlive it by much, because Mosquitto keeps routing a share
of the shared subscription into a dead node's session until it expires.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.chaos import cpu_name
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.schemas import NodeStatus
from cellwatch.shared.states import NodeState
from cellwatch.shared.topics import Topics
from tests.broker import Broker
from tests.models import write_test_bundle

T = Topics()
BIN = Path(sys.executable).parent
RESTART_SEC = 5.0


def measure(work: Path, broker: Broker, bundle: Path, keys: Path, runs: int) -> list[float]:
    pw = work / "node-1.password"
    pw.write_text(broker.password("node-1"))
    cfg = work / "node.toml"
    cfg.write_text(
        f'node_id = "node-1"\nlog_level = "WARNING"\nstate_dir = "{work / "state"}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\npassword_file = "{pw}"\n'
        f'[model]\nbundle = "{bundle}"\ntrusted_keys = "{keys}"\n'
    )
    online = threading.Event()
    boots: set[str] = set()

    def on_status(msg: object) -> None:
        payload = getattr(msg, "payload", b"")
        if payload:
            s = NodeStatus.model_validate_json(payload)
            if s.state is NodeState.ONLINE and s.boot_id not in boots:
                boots.add(s.boot_id)
                online.set()

    watch = MqttClient(
        broker.settings("hub"),
        client_id="startup-watch",
        clean_start=True,
        subscriptions=[(T.status("node-1"), 1)],
    )
    watch.set_message_handler(on_status)
    watch.connect()
    times = []
    try:
        for _ in range(runs):
            online.clear()
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [str(BIN / "cellwatch-node"), "run", "--config", str(cfg)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=os.environ.copy(),
            )
            if not online.wait(300):
                proc.kill()
                raise SystemExit("the node did not come online within 300 s")
            times.append(time.monotonic() - t0)
            proc.terminate()
            proc.wait(120)
    finally:
        watch.disconnect()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, action="append", default=[])
    parser.add_argument("--trusted-keys", type=Path, action="append", default=[])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cellwatch-startup-"))
    bundles = list(zip(args.bundle, args.trusted_keys, strict=True))
    if not bundles:
        keys = work / "keys"
        bundles = [(write_test_bundle(work / "toy", keys), keys)]
    broker = Broker.create(work / "broker", nodes=["node-1"])
    print(f"node start to online, {args.runs} runs each, on {cpu_name()} ({os.cpu_count()} cores)")
    print("| bundle | median | max | back after a crash (RestartSec 5 s + max) |")
    print("|---|---|---|---|")
    try:
        for bundle, keys in bundles:
            t = measure(work, broker, bundle, keys, args.runs)
            print(
                f"| {bundle.name} | {statistics.median(t):.1f} s | {max(t):.1f} s | "
                f"{RESTART_SEC + max(t):.1f} s |",
                flush=True,
            )
    finally:
        broker.close_clients()
        broker.stop()


if __name__ == "__main__":
    main()
