"""The lab client (cellwatch.client) against raw paho, and a node dying mid-batch.

    python bench/client.py [--images 3000] [--concurrency 32] [--rounds 3]
    python bench/client.py --failover [--bundle DIR --trusted-keys DIR]
        [--session-expiry 60] [--retry-after 10] [--images 400]

Throughput (default): one real node process (`cellwatch-node run`, the toy test
model, 64x48 JPEGs, so the node answers at full speed) through the project's
Mosquitto. The same images go through `Client.classify_many` and through a raw paho
MQTT v5 client (QoS 1 publishes with Response Topic and Correlation Data, the same
number in flight, replies parsed with json.loads), in alternating rounds. Prints the
throughput of each, the ratio, and the client process's CPU time per request
(getrusage: user + system of this process, which runs only the client).

Failover (--failover): two node processes share the images (shared subscription);
a batch goes through `classify_many` with the client's retry settings; once a
fifth of the batch is answered, one node gets SIGKILL. Prints the normal round
trip before the kill (p50/p99), when every image was answered, the attempts per
image and the longest round trip: the figures behind the retry defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import BIN, Broker, scratch, smear_jpeg
from cellwatch.client import Answer, Client, ClientSettings
from cellwatch.client.summary import percentile
from cellwatch.shared.mqtt import Message
from cellwatch.shared.topics import Topics
from tests.models import write_test_bundle

T = Topics()
NODES = ["node-1", "node-2"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def start_node(
    work: Path, broker: Broker, node_id: str, bundle: Path, keys: Path, expiry: int
) -> subprocess.Popen[bytes]:
    pw = work / f"{node_id}.password"
    pw.write_text(broker.password(node_id))
    cfg = work / f"{node_id}.toml"
    cfg.write_text(
        f'node_id = "{node_id}"\nlog_level = "WARNING"\n[mqtt]\nport = {broker.port}\n'
        f'host = "127.0.0.1"\npassword_file = "{pw}"\nsession_expiry_s = {expiry}\n'
        f'[model]\nbundle = "{bundle}"\ntrusted_keys = "{keys}"\n'
        f"[limits]\nreceive_maximum = 32\n"
    )
    return subprocess.Popen(
        [str(BIN / "cellwatch-node"), "run", "--config", str(cfg)],
        stdout=(work / f"{node_id}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_online(broker: Broker, nodes: list[str]) -> None:
    """Until each node published a retained `online` status."""
    seen: set[str] = set()
    cond = threading.Condition()

    def on_status(msg: Message) -> None:
        if msg.payload and json.loads(msg.payload).get("state") == "online":
            with cond:
                seen.add(T.node_id_of(msg.topic))
                cond.notify_all()

    c = broker.connect("hub", subscriptions=[(T.node_filter("status"), 1)], handler=on_status)
    with cond:
        if not cond.wait_for(lambda: seen >= set(nodes), 120):
            raise SystemExit(f"nodes not online: {set(nodes) - seen}")
    c.disconnect()


class RawPaho:
    """The baseline: plain paho, QoS 1, Response Topic + Correlation Data, a window."""

    def __init__(self, broker: Broker) -> None:
        self.topic = T.lab_images("client", "bench")
        self.reply = T.replies("client", "raw-bench")
        self.slots = threading.Semaphore(1)
        self.answered = 0
        self.done = threading.Event()
        self.expected = 0
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-bench", protocol=paho.MQTTv5)
        c.username_pw_set("client", broker.password("client"))
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.subscribe(self.reply, qos=1)
        c.loop_start()
        self.client = c
        time.sleep(0.5)  # SUBACK: a benchmark, not a test

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        json.loads(msg.payload)
        self.answered += 1
        self.slots.release()
        if self.answered >= self.expected:
            self.done.set()

    def run(self, payload: bytes, n: int, window: int) -> None:
        self.slots = threading.Semaphore(window)
        self.answered, self.expected = 0, n
        self.done.clear()
        for i in range(n):
            self.slots.acquire()
            p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            p.ResponseTopic = self.reply
            p.CorrelationData = i.to_bytes(4, "big")
            self.client.publish(self.topic, payload, qos=1, properties=p)
        if not self.done.wait(300):
            raise SystemExit(f"raw paho: {self.answered}/{n} answered")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def throughput(args: argparse.Namespace) -> None:
    work = scratch("cellwatch-bench-client-")
    bundle = write_test_bundle(work / "bundle", work / "keys")
    broker = Broker.create(work / "broker", nodes=NODES)
    node = start_node(work, broker, "node-1", bundle, work / "keys", 60)
    payload = smear_jpeg(h=48, w=64)
    try:
        wait_online(broker, ["node-1"])
        raw = RawPaho(broker)
        settings = ClientSettings(mqtt=broker.settings("client"), source="bench")
        with Client(settings) as client:
            raw.run(payload, 300, args.concurrency)  # warm-up
            list(client.classify_many([payload] * 300, concurrency=args.concurrency))
            rows: dict[str, list[tuple[float, float]]] = {"raw paho": [], "classify_many": []}
            for _ in range(args.rounds):
                for name in rows:
                    c0, t0 = cpu_s(), time.monotonic()
                    if name == "raw paho":
                        raw.run(payload, args.images, args.concurrency)
                    else:
                        answers = list(
                            client.classify_many(
                                [payload] * args.images, concurrency=args.concurrency
                            )
                        )
                        assert all(a.ok for a in answers), Counter(a.status for a in answers)
                    wall, cpu = time.monotonic() - t0, cpu_s() - c0
                    rows[name].append((args.images / wall, cpu / args.images * 1e3))
            stats = client.stats()
        raw.close()
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        broker.close_clients()
        broker.stop()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores, shared with the node and the broker)")
    print(
        f"{args.rounds} alternating rounds of {args.images} images (64x48 JPEG, toy model), "
        f"{args.concurrency} in flight, QoS 1; one node process"
    )
    print(f"{'client':>14}  {'images/s (mean, min..max)':>28}  {'client CPU ms/request':>22}")
    means = {}
    for name, values in rows.items():
        ips = [v[0] for v in values]
        ms = [v[1] for v in values]
        means[name] = statistics.mean(ips)
        print(
            f"{name:>14}  {means[name]:>10.0f} ({min(ips):.0f}..{max(ips):.0f}){'':>8}"
            f"  {statistics.mean(ms):>14.3f}"
        )
    ratio = means["classify_many"] / means["raw paho"]
    print(f"classify_many / raw paho: {ratio:.3f} (target >= 0.95)")
    print(f"client counters: {stats}")


def failover(args: argparse.Namespace) -> None:
    work = scratch("cellwatch-bench-failover-")
    if args.bundle is None:
        bundle, keys = write_test_bundle(work / "bundle", work / "keys"), work / "keys"
        payload = smear_jpeg()
        model = "toy test model, 640x480 JPEGs"
    else:
        bundle, keys = args.bundle, args.trusted_keys
        payload = smear_jpeg()
        model = f"{bundle}, 640x480 JPEGs"
    broker = Broker.create(work / "broker", nodes=NODES)
    nodes = {n: start_node(work, broker, n, bundle, keys, args.session_expiry) for n in NODES}
    settings = ClientSettings(
        mqtt=broker.settings("client"),
        source="bench",
        **({"retry_after_s": args.retry_after} if args.retry_after else {}),
        **({"timeout_s": args.timeout} if args.timeout else {}),
        **({"max_attempts": args.max_attempts} if args.max_attempts else {}),
    )
    answers: list[tuple[float, Answer]] = []
    killed_at: float | None = None
    try:
        wait_online(broker, NODES)
        with Client(settings) as client:
            list(client.classify_many([payload] * 50))  # warm-up
            t0 = time.monotonic()
            for a in client.classify_many([payload] * args.images):
                answers.append((time.monotonic(), a))
                if killed_at is None and len(answers) >= args.images // 5:
                    nodes["node-1"].kill()
                    killed_at = time.monotonic()
            stats = client.stats()
    finally:
        for proc in nodes.values():
            proc.kill()
            proc.wait(30)
        broker.close_clients()
        broker.stop()
    assert killed_at is not None
    before = [a.round_trip_s for t, a in answers if t <= killed_at and a.round_trip_s]
    after = [(t, a) for t, a in answers if t > killed_at]
    rtts = [a.round_trip_s for _, a in answers if a.round_trip_s is not None]
    attempts = Counter(a.attempts for _, a in answers)
    lost = args.images - sum(1 for _, a in answers if a.ok)
    s = settings
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores, shared by 2 nodes, broker, client)")
    print(
        f"{args.images} images ({model}), 2 node processes, node session_expiry_s "
        f"{args.session_expiry}; client retry_after_s {s.retry_after_s:g}, max_attempts "
        f"{s.max_attempts}, timeout_s {s.timeout_s:g}, concurrency {s.concurrency}"
    )
    print(
        f"before the kill: round trip p50 {percentile(before, 50) * 1000:.0f} ms, "
        f"p99 {percentile(before, 99) * 1000:.0f} ms (n={len(before)})"
    )
    last = max(t for t, _ in after) - killed_at if after else 0.0
    print(
        f"after SIGKILL of node-1 at {killed_at - t0:.1f} s: {len(after)} answers, the last "
        f"{last:.1f} s after the kill; longest round trip {max(rtts):.1f} s"
    )
    print(f"attempts per image: {dict(sorted(attempts.items()))}; not ok: {lost}")
    print(
        f"publishes {stats.sent} ({stats.retries} retries); dropped {stats.duplicates} "
        f"duplicates, {stats.late} late"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="images per round / batch")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--failover", action="store_true", help="kill a node mid-batch instead")
    p.add_argument("--bundle", type=Path, help="--failover: the nodes' bundle (default: toy)")
    p.add_argument("--trusted-keys", type=Path)
    p.add_argument("--session-expiry", type=int, default=60, help="the nodes' session_expiry_s")
    p.add_argument("--retry-after", type=float, help="client retry_after_s (default: its own)")
    p.add_argument("--timeout", type=float, help="client timeout_s (default: its own)")
    p.add_argument("--max-attempts", type=int, help="client max_attempts (default: its own)")
    args = p.parse_args()
    if args.failover:
        args.images = args.images or 400
        failover(args)
    else:
        args.images = args.images or 3000
        throughput(args)


if __name__ == "__main__":
    main()
