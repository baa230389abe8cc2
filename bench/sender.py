"""Sender process for bench/node_throughput.py: the lab client with a window of images.

    python bench/sender.py --port P --password PW --image FILE --count N --window 32 \
        --node NODE

`cellwatch.client`'s `classify_many(images, concurrency=WINDOW, node=NODE)`: QoS 1
on the node's direct topic, `--window` images in flight, each with its own
Correlation Data and Response Topic; no retries within the run (a bench measures,
it does not recover). It connects, prints `ready`, and starts when a line arrives
on stdin (so the caller can read CPU counters just before); at the end it prints
one JSON line: arrival times, round trips, the node's own timings and this
process's CPU time. A separate process, so that it does not share an interpreter
(GIL) with the benchmark or the node.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from pydantic import SecretStr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellwatch.client import Client, ClientSettings  # noqa: E402
from cellwatch.shared.settings import MqttSettings  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--window", type=int, default=32, help="images in flight")
    p.add_argument("--node", required=True, help="send to this node's direct topic")
    p.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args()
    payload = a.image.read_bytes()
    settings = ClientSettings(
        mqtt=MqttSettings(
            host=a.host, port=a.port, username="client", password=SecretStr(a.password)
        ),
        timeout_s=a.timeout,
        retry_after_s=a.timeout,
        max_attempts=1,
    )
    arrived: list[float] = []
    round_trip_ms: list[float] = []
    node_ms: list[float] = []
    parts: dict[str, list[float]] = {"queue": [], "decode": [], "preprocess": [], "infer": []}
    errors: dict[str, int] = {}
    with Client(settings) as client:
        print("ready", flush=True)
        sys.stdin.readline()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        images = (payload for _ in range(a.count))
        for answer in client.classify_many(images, concurrency=a.window, node=a.node):
            arrived.append(time.monotonic())
            if not answer.ok:
                errors[answer.status] = errors.get(answer.status, 0) + 1
            round_trip_ms.append((answer.round_trip_s or 0.0) * 1000)
            if answer.result is not None:
                t = answer.result.timings_ms
                node_ms.append(t.total)
                for name, value in zip(
                    parts, (t.queue, t.decode, t.preprocess, t.infer), strict=True
                ):
                    parts[name].append(value)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    out = {
        "arrived_at": arrived,
        "round_trip_ms": round_trip_ms,
        "node_ms": node_ms,
        "node_parts_ms": parts,
        "errors": errors,
        "cpu_s": cpu_s,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
