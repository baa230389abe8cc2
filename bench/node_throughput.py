"""Node throughput, CPU per image and latency against OpenVINO's benchmark_app, in one run.

    python bench/node_throughput.py [--fp16 DIR] [--int8 DIR] [--trusted-keys DIR]
                                    [--profile DIR]

For each bundle (int8 and fp16; without --fp16/--int8 the bench first makes an
Inception V3 bundle of each with the training CLI, random-init weights: speed does
not depend on the weights):

(a) benchmark_app on the bundle's IR, THROUGHPUT and LATENCY hints, with its CPU
    time per inference (its process CPU time, less a one-inference run's, over the
    iterations);
(b) a real node process (default settings, THROUGHPUT hint, receive maximum 32)
    fed through a real Mosquitto by the lab client in a separate process
    (bench/sender.py: `classify_many(concurrency=32, node=...)`, QoS 1 on the
    node's direct topic, 32 images in flight). Three images: 640x480 JPEG, 2592x1944 JPEG (the
    ALL-IDB1 microscope size) and a 640x480 uncompressed TIFF. For each: steady
    throughput, the ratio to (a), and the node process's CPU ms per image
    (getrusage of the node, robust to other load on the machine), with the part
    that decoding, cropping and resizing alone cost (measured in this process, one
    thread), and the broker's and the sender's CPU per image;
(c) single-image round trips with the node on the LATENCY hint, both JPEG sizes,
    against benchmark_app's LATENCY median.

"CPU bound" in the table is the throughput the machine's cores allow at these CPU
costs if nothing else ran: cores x 1000 / (node + broker + sender CPU ms per image),
the three share the cores here; "bound ratio" is that over benchmark_app's img/s,
the best ratio the node can reach on this machine (benchmark_app itself may leave
part of the cores idle: its CPU ms per inference x img/s / 1000 says how much).

--profile DIR: one more run per bundle and image with py-spy (in the dev extra)
attached to the node in --gil mode, which samples the thread holding the GIL: the
node's Python time, function by function (the raw stacks in DIR, for a flame graph
with any collapsed-stack viewer; the top functions printed). Native work done
without the GIL (decoding, inference) is what the CPU columns measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    BIN,
    Broker,
    benchmark_app,
    benchmark_app_cpu,
    cpu_name,
    inception_bundles,
    scratch,
    smear_bgr,
)
from cellwatch.node.decode import ImageLimits, decode_image
from cellwatch.node.preprocess import crop_and_resize
from cellwatch.shared.manifest import PreprocessingSpec
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.topics import Topics

T = Topics()
NODE = "bench-node"
WINDOW = 32
KINDS = ("small", "large", "tiff")
"""--only names of the images make_images() returns, in its order."""


@dataclass(frozen=True)
class Image:
    name: str
    payload: bytes
    count: int


@dataclass
class Run:
    ips: float
    n: int
    errors: dict[str, int]
    node_cpu_ms: float
    broker_cpu_ms: float
    sender_cpu_ms: float
    others_cpu_ms: float
    """CPU of every other process on the machine during the run, per image."""
    rtt_ms: list[float]
    node_ms: list[float]
    node_parts_ms: dict[str, list[float]]


def make_images(large: int, small: int) -> list[Image]:
    small_img = smear_bgr(h=480, w=640)
    large_img = smear_bgr(h=1944, w=2592)
    q90 = [cv2.IMWRITE_JPEG_QUALITY, 90]
    return [
        Image("640x480 JPEG", cv2.imencode(".jpg", small_img, q90)[1].tobytes(), small),
        Image("2592x1944 JPEG", cv2.imencode(".jpg", large_img, q90)[1].tobytes(), large),
        Image(
            "640x480 TIFF",
            cv2.imencode(".tif", small_img, [cv2.IMWRITE_TIFF_COMPRESSION, 1])[1].tobytes(),
            small,
        ),
    ]


def decode_cpu_ms(payload: bytes, repeat: int = 30) -> float:
    """CPU ms of the node's decode + crop and resize of payload (its part of the
    preprocessing; OpenVINO does the rest), in this process, one thread."""
    cv2.setNumThreads(1)
    spec, limits = PreprocessingSpec(), ImageLimits()
    crop_and_resize(decode_image(payload, limits, spec.size), spec)
    t0 = time.process_time()
    for _ in range(repeat):
        crop_and_resize(decode_image(payload, limits, spec.size), spec)
    return (time.process_time() - t0) / repeat * 1000.0


def start_node(work: Path, broker: Broker, bundle: Path, keys: Path, hint: str) -> psutil.Popen:
    pw = work / "node.password"
    pw.write_text(broker.password(NODE))
    cfg = work / f"node-{hint}.toml"
    cfg.write_text(
        f'node_id = "{NODE}"\nlog_level = "WARNING"\nstate_dir = "{work / "state"}"\n'
        f'[mqtt]\nport = {broker.port}\nhost = "127.0.0.1"\npassword_file = "{pw}"\n'
        f'[model]\nbundle = "{bundle}"\ntrusted_keys = "{keys}"\n'
        f'[inference]\nperformance_hint = "{hint}"\n[limits]\nreceive_maximum = {WINDOW}\n'
    )
    proc = psutil.Popen([str(BIN / "cellwatch-node"), "run", "--config", str(cfg)])
    wait_online(broker)
    return proc


def stop_node(proc: psutil.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def wait_online(broker: Broker) -> None:
    seen = threading.Event()
    c = MqttClient(
        broker.settings("hub"),
        client_id="bench-watch",
        clean_start=True,
        subscriptions=[(T.status(NODE), 1)],
    )
    c.set_message_handler(lambda m: seen.set() if b'"online"' in m.payload else None)
    c.connect()
    try:
        if not seen.wait(120):
            raise SystemExit("node did not come online")
    finally:
        c.disconnect()


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def send(
    work: Path,
    broker: Broker,
    node: psutil.Process,
    image: Image,
    count: int,
    window: int,
    profile: Path | None = None,
) -> Run:
    """One sender run against the node; CPU counters read around it."""
    path = work / "image.bin"
    path.write_bytes(image.payload)
    sender = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("sender.py")),
            "--port",
            str(broker.port),
            "--password",
            broker.password("client"),
            "--image",
            str(path),
            "--count",
            str(count),
            "--window",
            str(window),
            "--node",
            NODE,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sender.stdin is not None and sender.stdout is not None
    if sender.stdout.readline().strip() != "ready":
        raise SystemExit("sender did not start")
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            [
                str(BIN / "py-spy"),
                *("record", "--gil", "--format", "raw", "--rate", "500"),
                *("-o", str(profile), "--pid", str(node.pid)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches
    broker_proc = psutil.Process(broker.pid)
    node0, broker0, busy0 = cpu_s(node), cpu_s(broker_proc), machine_busy_s()
    sender.stdin.write("go\n")
    sender.stdin.flush()
    line = sender.stdout.readline()
    node1, broker1, busy1 = cpu_s(node), cpu_s(broker_proc), machine_busy_s()
    if sender.wait(60) != 0 or not line:
        raise SystemExit(f"sender failed on {image.name}")
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    out: dict[str, Any] = json.loads(line)
    steady = np.sort(np.array(out["arrived_at"]))
    node_s, broker_s, sender_s = node1 - node0, broker1 - broker0, float(out["cpu_s"])
    return Run(
        ips=float((count - 1) / (steady[-1] - steady[0])),
        n=count,
        errors=dict(out["errors"]),
        node_cpu_ms=node_s / count * 1000,
        broker_cpu_ms=broker_s / count * 1000,
        sender_cpu_ms=sender_s / count * 1000,
        others_cpu_ms=max(0.0, (busy1 - busy0) - node_s - broker_s - sender_s) / count * 1000,
        rtt_ms=[float(v) for v in out["round_trip_ms"]],
        node_ms=list(out["node_ms"]),
        node_parts_ms=dict(out["node_parts_ms"]),
    )


def top_items(raw: Path, n: int = 12) -> str:
    """The functions with the most samples in a py-spy raw (collapsed) profile: self
    (the leaf frame) and total (anywhere on the stack), as % of all samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        samples += count
        names = [_frame_name(f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            total[name] += count
    lines = [f"    {samples} samples; self% (leaf) | total% (on stack)"]
    for (a, ca), (b, cb) in zip(own.most_common(n), total.most_common(n), strict=False):
        lines.append(
            f"    {100 * ca / samples:5.1f}% {a[:60]:60} | {100 * cb / samples:5.1f}% {b[:60]}"
        )
    return "\n".join(lines)


def _frame_name(frame: str) -> str:
    """'func (path/to/module.py:12)' -> 'func (module.py)'."""
    func, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{func} ({file})" if file else func


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fp16", type=Path, help="an fp16 bundle (default: make one)")
    ap.add_argument("--int8", type=Path, help="an int8 bundle (default: make one)")
    ap.add_argument("--trusted-keys", type=Path, help="keys that signed --fp16/--int8")
    ap.add_argument("--images", type=int, default=600, help="640x480 images per run")
    ap.add_argument("--large-images", type=int, default=300, help="2592x1944 images per run")
    ap.add_argument("--latency-images", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=15, help="benchmark_app duration")
    ap.add_argument("--profile", type=Path, help="directory for py-spy profiles of the node")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated subset of: int8, fp16, small (640x480 JPEG), large "
        "(2592x1944 JPEG), tiff, latency",
    )
    a = ap.parse_args()
    work = scratch("cellwatch-bench-node-")
    if a.fp16 is None or a.int8 is None:
        print("making Inception V3 int8 and fp16 bundles with cellwatch-train ...")
        bundles, keys = inception_bundles(work / "train", ["int8", "fp16"])
    elif a.trusted_keys is None:
        raise SystemExit("--trusted-keys is required with --fp16 and --int8")
    else:
        bundles, keys = {"int8": a.int8, "fp16": a.fp16}, a.trusted_keys
    only = {w.strip() for w in a.only.split(",") if w.strip()}
    images = make_images(a.large_images, a.images)
    if only & set(KINDS):
        images = [im for im, kind in zip(images, KINDS, strict=True) if kind in only]
    if only & {"int8", "fp16"}:
        bundles = {p: b for p, b in bundles.items() if p in only}
    measure_latency = not only or "latency" in only
    cores = os.cpu_count() or 1
    load0 = os.getloadavg()
    print(f"machine: {cpu_name()}, {cores} CPUs, Python {platform.python_version()}")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    decode_ms = {im.name: decode_cpu_ms(im.payload) for im in images}
    for im in images:
        print(f"  {im.name}: {len(im.payload)} bytes, decode+resize {decode_ms[im.name]:.2f} ms")
    rows: list[tuple[str, Image, dict[str, float], Run]] = []
    latency: list[tuple[str, str, dict[str, float], Run]] = []
    for precision, bundle in bundles.items():
        xml = bundle / "model.xml"
        print(f"{precision}: benchmark_app THROUGHPUT and LATENCY ...", flush=True)
        ba_tput = benchmark_app_cpu(xml, "throughput", a.seconds)
        ba_lat = benchmark_app(xml, "latency", a.seconds)
        broker = Broker.create(work / f"broker-{precision}", nodes=[NODE])
        try:
            node = start_node(work, broker, bundle, keys, "throughput")
            for im in images:
                send(work, broker, node, im, min(64, im.count), WINDOW)  # warm-up
                run = send(work, broker, node, im, im.count, WINDOW)
                rows.append((precision, im, ba_tput, run))
                print(
                    f"  node {im.name}: {run.ips:.1f} img/s, {run.node_cpu_ms:.2f} CPU ms/img"
                    + (f", errors {run.errors}" if run.errors else ""),
                    flush=True,
                )
                if a.profile is not None:
                    a.profile.mkdir(parents=True, exist_ok=True)
                    stem = f"{precision}-{im.name.replace(' ', '-')}"
                    raw = a.profile / f"{stem}.txt"
                    send(work, broker, node, im, im.count, WINDOW, profile=raw)
                    print(f"  profile of the node ({raw}):\n{top_items(raw, 30)}", flush=True)
            stop_node(node)
            if not measure_latency:
                continue
            node = start_node(work, broker, bundle, keys, "latency")
            for im in [im for im in images if "JPEG" in im.name]:
                send(work, broker, node, im, 5, 1)  # warm-up
                run = send(work, broker, node, im, a.latency_images, 1)
                latency.append((precision, im.name, ba_lat, run))
            stop_node(node)
        finally:
            broker.stop()
    load1 = os.getloadavg()
    print_tables(rows, latency, decode_ms, cores)
    print(
        f"\nmachine: {cpu_name()}, {cores} CPUs; load average at start "
        f"{load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, at end "
        f"{load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} (1 / 5 / 15 min)"
    )


def print_tables(
    rows: list[tuple[str, Image, dict[str, float], Run]],
    latency: list[tuple[str, str, dict[str, float], Run]],
    decode_ms: dict[str, float],
    cores: int,
) -> None:
    targets = {
        ("int8", "640x480 JPEG"): 0.90,
        ("fp16", "640x480 JPEG"): 0.90,
        ("int8", "2592x1944 JPEG"): 0.80,
        ("fp16", "2592x1944 JPEG"): 0.88,
    }
    print()
    print(
        "| bundle | image | benchmark_app img/s | node img/s | ratio (target) "
        "| CPU ms/img: benchmark_app | node | of which decode+resize "
        "| CPU bound img/s | bound ratio | broker / sender / others ms/img | n |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for precision, im, ba, run in rows:
        target = targets.get((precision, im.name))
        ratio = run.ips / ba["throughput"]
        bound = cores * 1000 / (run.node_cpu_ms + run.broker_cpu_ms + run.sender_cpu_ms)
        print(
            f"| {precision} | {im.name} | {ba['throughput']:.1f} | {run.ips:.1f} | "
            f"{ratio:.2f}{f' ({target:.2f})' if target else ''} | {ba['cpu_ms']:.2f} | "
            f"{run.node_cpu_ms:.2f} | {decode_ms[im.name]:.2f} | "
            f"{bound:.0f} | {bound / ba['throughput']:.2f} | "
            f"{run.broker_cpu_ms:.2f} / {run.sender_cpu_ms:.2f} / {run.others_cpu_ms:.2f} | "
            f"{run.n}{f', errors {run.errors}' if run.errors else ''} |"
        )
    print()
    print(
        "| bundle | image | benchmark_app LATENCY median ms | node round trip p50 / p99 ms "
        "(target p50) | inside the node p50 ms: total = queue + decode + preprocess + infer |"
    )
    print("|---|---|---|---|---|")
    for precision, name, ba, run in latency:
        p50, p99 = (float(v) for v in np.percentile(run.rtt_ms, [50, 99]))
        parts = " + ".join(f"{np.median(v):.1f}" for v in run.node_parts_ms.values())
        print(
            f"| {precision} | {name} | {ba['median_ms']:.1f} | {p50:.1f} / {p99:.1f} "
            f"(<= {ba['median_ms'] + 3:.1f}) | {np.median(run.node_ms):.1f} = {parts} |"
        )


if __name__ == "__main__":
    main()
