"""Node throughput and latency against OpenVINO's benchmark_app, in one run.

    python bench/node_throughput.py [--bundle DIR --trusted-keys DIR] [--images 600]

(a) benchmark_app on the bundle's IR (THROUGHPUT hint) and (b) a real node process
fed 640x480 JPEGs at QoS 1 through a real Mosquitto by a separate publisher
process; prints both and the ratio (b)/(a). Then single-image round trips at low
load with the node on the LATENCY hint, next to benchmark_app's LATENCY median.
Without --bundle it first makes an Inception V3 bundle with the training CLI
(random-init weights: speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    BIN,
    Broker,
    benchmark_app,
    inception_bundle,
    scratch,
    smear_jpeg,
)
from cellwatch.shared.mqtt import MqttClient, PublishProps
from cellwatch.shared.schemas import Result
from cellwatch.shared.topics import Topics

T = Topics()
REPLY = T.replies("client", "bench")


class Results:
    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.errors = 0
        self.error_codes: dict[str, int] = {}
        self.node_ms: dict[int, float] = {}
        self.cond = threading.Condition()

    def __call__(self, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        idx = int(bytes(msg.properties.CorrelationData))  # type: ignore[union-attr]
        result = Result.model_validate_json(msg.payload)
        with self.cond:
            self.node_ms[idx] = result.timings_ms.total
            self.arrivals.setdefault(idx, now)
            if result.error is not None:
                self.errors += 1
                key = result.error.message
                self.error_codes[key] = self.error_codes.get(key, 0) + 1
            self.cond.notify_all()

    def wait(self, n: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.arrivals) >= n, timeout):
                raise SystemExit(f"only {len(self.arrivals)}/{n} results after {timeout} s")


def start_node(
    work: Path, broker: Broker, bundle: Path, keys: Path, hint: str
) -> subprocess.Popen[bytes]:
    pw = work / "node.password"
    pw.write_text(broker.password("bench-node"))
    cfg = work / f"node-{hint}.toml"
    cfg.write_text(
        f'node_id = "bench-node"\nlog_level = "WARNING"\nstate_dir = "{work / "state"}"\n'
        f"[mqtt]\nport = {broker.port}\n"
        f'host = "127.0.0.1"\npassword_file = "{pw}"\n[model]\nbundle = "{bundle}"\n'
        f'trusted_keys = "{keys}"\n[inference]\nperformance_hint = "{hint}"\n'
        f"[limits]\nreceive_maximum = 32\n"
    )
    proc = subprocess.Popen([str(BIN / "cellwatch-node"), "run", "--config", str(cfg)])
    return proc


def wait_online(broker: Broker) -> None:
    seen = threading.Event()
    c = MqttClient(
        broker.settings("hub"),
        client_id="bench-watch",
        clean_start=True,
        subscriptions=[(T.status("bench-node"), 1)],
    )
    c.set_message_handler(lambda m: seen.set() if b'"online"' in m.payload else None)
    c.connect()
    if not seen.wait(120):
        raise SystemExit("node did not come online")
    c.disconnect()


def results_client(broker: Broker, client_id: str, results: Results) -> MqttClient:
    """A connected `client` user that hands every reply on REPLY to results."""
    c = MqttClient(
        broker.settings("client"),
        client_id=client_id,
        clean_start=True,
        subscriptions=[(REPLY, 1)],
    )
    c.set_message_handler(results)
    c.connect()
    return c


def throughput_run(work: Path, broker: Broker, image: Path, n: int) -> float:
    results = Results()
    sub = results_client(broker, "bench-results", results)
    pub = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("publisher.py")),
            "--port",
            str(broker.port),
            "--password",
            broker.password("client"),
            "--image",
            str(image),
            "--count",
            str(n),
            "--reply-topic",
            REPLY,
        ]
    )
    results.wait(n, timeout=n * 2.0 + 60)
    pub.wait(60)
    sub.disconnect()
    times = np.sort(np.array(list(results.arrivals.values())))
    ips = (n - 1) / (times[-1] - times[0])  # from the first Result to the last
    print(f"  node: {n} results, {results.errors} errors, steady state {ips:.1f} img/s")
    if results.errors:
        print(f"  errors: {results.error_codes}")
    return float(ips)


def latency_run(broker: Broker, payload: bytes, n: int) -> tuple[float, float, float]:
    results = Results()
    c = results_client(broker, "bench-latency", results)
    rtts = []
    for i in range(n + 5):
        t0 = time.monotonic()
        c.publish(
            T.images("bench"),
            payload,
            qos=1,
            props=PublishProps(response_topic=REPLY, correlation_data=str(i).encode()),
        )
        results.wait(i + 1, 60)
        if i >= 5:  # warm-up
            rtts.append((results.arrivals[i] - t0) * 1000)
    c.disconnect()
    inside = [results.node_ms[i] for i in range(5, n + 5)]
    return (
        float(np.percentile(rtts, 50)),
        float(np.percentile(rtts, 99)),
        float(np.percentile(inside, 50)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--trusted-keys", type=Path)
    ap.add_argument("--images", type=int, default=600, help="images in the throughput run")
    ap.add_argument("--latency-images", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=20, help="benchmark_app duration")
    a = ap.parse_args()
    work = scratch("cellwatch-bench-node-")
    if a.bundle is None:
        print("making an Inception V3 fp16 bundle with cellwatch-train ...")
        a.bundle, a.trusted_keys = inception_bundle(work / "train", "fp16")
    image = work / "smear.jpg"
    image.write_bytes(smear_jpeg())
    xml = a.bundle / "model.xml"
    print(f"bundle: {a.bundle}")
    print("benchmark_app (THROUGHPUT hint) ...", flush=True)
    ba_tput = benchmark_app(xml, "throughput", a.seconds)
    print("benchmark_app (LATENCY hint) ...", flush=True)
    ba_lat = benchmark_app(xml, "latency", a.seconds)
    broker = Broker.create(work / "broker", nodes=["bench-node"])
    try:
        node = start_node(work, broker, a.bundle, a.trusted_keys, "throughput")
        wait_online(broker)
        node_ips = throughput_run(work, broker, image, a.images)
        node.terminate()
        node.wait(60)
        node = start_node(work, broker, a.bundle, a.trusted_keys, "latency")
        wait_online(broker)
        p50, p99, inside50 = latency_run(broker, image.read_bytes(), a.latency_images)
        node.terminate()
        node.wait(60)
    finally:
        broker.stop()
    print()
    print(f"{'':38}{'img/s':>10}")
    print(f"{'benchmark_app THROUGHPUT':38}{ba_tput['throughput']:>10.1f}")
    print(f"{'node over MQTT (QoS 1, 640x480 JPEG)':38}{node_ips:>10.1f}")
    print(
        f"{'ratio node / benchmark_app':38}{node_ips / ba_tput['throughput']:>10.2f}"
        "   (target >= 0.90)"
    )
    print()
    print(f"{'':38}{'ms':>10}")
    print(f"{'benchmark_app LATENCY median':38}{ba_lat['median_ms']:>10.1f}")
    print(
        f"{'node round trip p50 (LATENCY hint)':38}{p50:>10.1f}"
        f"   (target <= {ba_lat['median_ms'] + 10:.1f})"
    )
    print(f"{'node round trip p99':38}{p99:>10.1f}")
    print(f"{'  of which inside the node (p50)':38}{inside50:>10.1f}")


if __name__ == "__main__":
    main()
