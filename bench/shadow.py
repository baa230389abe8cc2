"""What the shadow phase costs the live path, measured: shadow off, at 20% and at 100%,
interleaved in one run on one machine, and the node's memory with one and two models.

    python bench/shadow.py [--active DIR --candidate DIR --trusted-keys DIR]
                           [--rounds 3] [--images 400] [--latency-images 150]

Without bundles it makes two Inception V3 int8 bundles (versions 1 and 2 of one run,
random weights: speed does not depend on them) with the training CLI. One node
process (default settings, THROUGHPUT hint) serves the first; the second sits in its
bundle store, as a node that fetched it for a shadow phase keeps it, so switching the
phase on costs a compile, not a download. The bench writes the retained shadow order
itself, as the hub would (`nodes/{node}/shadow`), and reads the node's shadow reports.

Each round runs the three modes, in a rotating order (off, 20%, 100%; then 20%, 100%,
off; ...), and in each mode:
- throughput: the lab client in its own process (bench/sender.py) keeps 32 images in
  flight on the node's direct topic; img/s, node CPU ms per image;
- latency: one image at a time (the client sends the next when the Result is back):
  round trip p50 / p99, the worst case for shadow work, which then starts between
  images and is cancelled by the next one;
- the node's shadow windows over each run: images scored and skipped (busy).
Medians over the rounds are printed as a table, with the node's RSS before the
candidate was ever loaded (one model) and while it is loaded (two models), and the CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import BIN, Broker, cpu_name, inception_bundles, scratch, smear_jpeg
from bench.node_throughput import NODE, WINDOW, Image, Run, send, stop_node, wait_online
from cellwatch.node.store import BundleStore
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.mqtt import Message, MqttClient
from cellwatch.shared.schemas import ModelRef, ShadowOrder, ShadowReport, utcnow
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.states import ShadowState
from cellwatch.shared.topics import Topics

T = Topics()
MODES: tuple[tuple[str, float], ...] = (("off", 0.0), ("20%", 0.2), ("100%", 1.0))


class Reports:
    """The node's shadow reports, as the hub would receive them."""

    def __init__(self, broker: Broker) -> None:
        self._lock = threading.Lock()
        self.items: list[ShadowReport] = []
        self.client = MqttClient(
            broker.settings("hub"),
            client_id="bench-shadow-hub",
            clean_start=True,
            subscriptions=[(T.shadow_report(NODE), 1)],
        )
        self.client.set_message_handler(self._on)
        self.client.connect()

    def _on(self, m: Message) -> None:
        with self._lock:
            self.items.append(ShadowReport.model_validate_json(m.payload))

    def count(self) -> int:
        with self._lock:
            return len(self.items)

    def since(self, start: int) -> list[ShadowReport]:
        with self._lock:
            return list(self.items[start:])

    def wait_state(self, state: ShadowState, start: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.since(start)
            failed = [r for r in got if r.state is ShadowState.FAILED]
            if failed:
                raise SystemExit(f"the node refused the candidate: {failed[0].error}")
            if any(r.state is state for r in got):
                return
            time.sleep(0.05)
        raise SystemExit(f"the node did not report {state}")


def start_node(work: Path, broker: Broker, active: Path, store: Path, keys: Path) -> psutil.Popen:
    pw = work / "node.password"
    pw.write_text(broker.password(NODE))
    cfg = work / "node.toml"
    cfg.write_text(
        f'node_id = "{NODE}"\nlog_level = "WARNING"\nstate_dir = "{work / "state"}"\n'
        "telemetry_interval_s = 1.0\n"
        f'[mqtt]\nport = {broker.port}\nhost = "127.0.0.1"\npassword_file = "{pw}"\n'
        f'[model]\nbundle = "{active}"\ntrusted_keys = "{keys}"\n'
        f'[updates]\nstore_dir = "{store}"\n'
        f"[limits]\nreceive_maximum = {WINDOW}\n"
        "[shadow]\nwindow_s = 1.0\n"
    )
    proc = psutil.Popen([str(BIN / "cellwatch-node"), "run", "--config", str(cfg)])
    wait_online(broker)
    return proc


def set_mode(hub: MqttClient, reports: Reports, candidate: ModelRef, rate: float) -> None:
    """Write the shadow order for rate (0: stop) and wait until the node carries it out."""
    start = reports.count()
    order = ShadowOrder(
        rollout_id="bench", model=candidate if rate else None, rate=rate, issued_at=utcnow()
    )
    if not hub.publish_wait(T.shadow(NODE), order.to_json(), qos=1, retain=True):
        raise SystemExit("the broker refused the shadow order")
    if rate:
        reports.wait_state(ShadowState.SHADOWING, start)
    elif start:  # the candidate was loaded: wait until it is let go
        reports.wait_state(ShadowState.STOPPED, start)


SETTLE_S = 2.5
"""The node closes a shadow window every second: after this the last one has arrived."""


def shadow_counts(reports: Reports, start: int) -> tuple[int, int]:
    """(scored, skipped) in the windows reported since start (the last one flushed)."""
    time.sleep(SETTLE_S)
    windows = [r.window for r in reports.since(start) if r.window is not None]
    return sum(w.n for w in windows), sum(w.skipped for w in windows)


def export_v2(work: Path, keys: Path) -> Path:
    out = work / "train" / "bundle-int8-v2"
    subprocess.run(
        [
            str(BIN / "cellwatch-train"),
            "export",
            str(work / "train" / "run"),
            *("--out", str(out), "--name", "bench-inception", "--version", "2"),
            *("--precision", "int8", "--sign-key", str(keys / "bench.key")),
            *("--allow-untrained", "--allow-no-skill", "--allow-degraded"),  # as common.py
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--active", type=Path, help="the serving bundle (default: make one)")
    ap.add_argument("--candidate", type=Path, help="the shadow candidate (default: make one)")
    ap.add_argument("--trusted-keys", type=Path, help="keys that signed them")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=400, help="images per throughput run")
    ap.add_argument("--latency-images", type=int, default=150, help="images per latency run")
    a = ap.parse_args()
    work = scratch("cellwatch-bench-shadow-")
    if a.active is None or a.candidate is None or a.trusted_keys is None:
        print("making two Inception V3 int8 bundles with cellwatch-train ...", flush=True)
        made, keys = inception_bundles(work / "train", ["int8"])
        active, candidate = made["int8"], export_v2(work, keys)
    else:
        active, candidate, keys = a.active, a.candidate, a.trusted_keys
    ref = load_bundle(candidate, TrustedKeys.load(keys)).ref
    store = work / "store"
    kept = BundleStore(store)
    kept.import_dir(ref.manifest_sha256, candidate)
    kept.pin_shadow(ref.manifest_sha256)
    image = Image("640x480 JPEG", smear_jpeg(), a.images)
    cores = os.cpu_count() or 1
    load0 = os.getloadavg()
    print(f"machine: {cpu_name()}, {cores} CPUs; load average {load0[0]:.2f}", flush=True)
    broker = Broker.create(work / "broker", nodes=[NODE])
    results: dict[str, list[tuple[Run, Run, tuple[int, int], tuple[int, int]]]] = {
        m: [] for m, _ in MODES
    }
    try:
        node = start_node(work, broker, active, store, keys)
        reports = Reports(broker)
        hub = broker.connect("hub")
        send(work, broker, node, image, 64, WINDOW)  # warm-up
        rss_one = node.memory_info().rss / 2**20
        rss_two = 0.0
        for r in range(a.rounds):
            order = MODES[r % 3 :] + MODES[: r % 3]
            for mode, rate in order:
                set_mode(hub, reports, ref, rate)
                if rate:
                    rss_two = max(rss_two, node.memory_info().rss / 2**20)
                send(work, broker, node, image, 32, WINDOW)  # warm-up in this mode
                time.sleep(SETTLE_S)  # its windows are in before the run's count starts
                start = reports.count()
                tput = send(work, broker, node, image, a.images, WINDOW)
                counts_t = shadow_counts(reports, start)
                start = reports.count()
                lat = send(work, broker, node, image, a.latency_images, 1)
                counts_l = shadow_counts(reports, start)
                results[mode].append((tput, lat, counts_t, counts_l))
                p50, p99 = np.percentile(lat.rtt_ms, [50, 99])
                print(
                    f"  round {r + 1} shadow {mode:>4}: {tput.ips:.1f} img/s, "
                    f"{tput.node_cpu_ms:.2f} CPU ms/img; one at a time p50 {p50:.1f} / "
                    f"p99 {p99:.1f} ms; scored/skipped {counts_t} and {counts_l}",
                    flush=True,
                )
        set_mode(hub, reports, ref, 0.0)
        stop_node(node)
        hub.disconnect()
        reports.client.disconnect()
    finally:
        broker.stop()
    load1 = os.getloadavg()
    print()
    print(
        "| shadow | img/s, 32 in flight | node CPU ms/img | scored / skipped (of "
        f"{a.images}) | round trip p50 / p99 ms, one at a time | scored / skipped (of "
        f"{a.latency_images}) |"
    )
    print("|---|---|---|---|---|---|")
    for mode, _ in MODES:
        runs = results[mode]
        ips = np.median([t.ips for t, _, _, _ in runs])
        cpu = np.median([t.node_cpu_ms for t, _, _, _ in runs])
        p50 = np.median([np.percentile(lat.rtt_ms, 50) for _, lat, _, _ in runs])
        p99 = np.median([np.percentile(lat.rtt_ms, 99) for _, lat, _, _ in runs])
        st = tuple(int(np.median([c[i] for _, _, c, _ in runs])) for i in (0, 1))
        sl = tuple(int(np.median([c[i] for _, _, _, c in runs])) for i in (0, 1))
        print(
            f"| {mode} | {ips:.1f} | {cpu:.2f} | {st[0]} / {st[1]} | {p50:.1f} / {p99:.1f} | "
            f"{sl[0]} / {sl[1]} |"
        )
    weights = load_bundle(candidate, TrustedKeys.load(keys)).manifest.files["model.bin"].size
    print(
        f"\nnode RSS: {rss_one:.0f} MiB with one model, {rss_two:.0f} MiB with the candidate "
        f"beside it (+{rss_two - rss_one:.0f} MiB); candidate model.bin {weights / 2**20:.1f} MiB"
    )
    print(
        f"machine: {cpu_name()}, {cores} CPUs; medians of {a.rounds} interleaved rounds; "
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end"
    )


if __name__ == "__main__":
    main()
