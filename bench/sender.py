"""Sender process for bench/node_throughput.py: a lab client with a window of images.

    python bench/sender.py --port P --password PW --image FILE --count N --window 32 \
        --topic cellwatch/nodes/NODE/images --reply-topic cellwatch/replies/client/x

A raw paho client (MQTT v5, QoS 1), as `classify_many(..., concurrency=32)` uses the
node: `--window` images in flight, each with a Response Topic and its index as
Correlation Data; every Result that arrives sends the next image. It connects,
prints `ready`, and starts when a line arrives on stdin (so the caller can read
CPU counters just before); at the end it prints one JSON line: send and arrival
times, the node's own timings and this process's CPU time. A separate process, so
that it does not share an interpreter (GIL) with the benchmark or the node.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Sender:
    def __init__(self, a: argparse.Namespace) -> None:
        self.payload = a.image.read_bytes()
        self.count = a.count
        self.window = a.window
        self.topic = a.topic
        self.reply_topic = a.reply_topic
        self.sent_at: list[float] = [0.0] * a.count
        self.arrived_at: list[float] = [0.0] * a.count
        self.node_ms: list[float] = [0.0] * a.count
        self.errors: dict[str, int] = {}
        self.next = 0
        self.received = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sender", protocol=paho.MQTTv5)
        c.username_pw_set("client", a.password)
        c.max_inflight_messages_set(max(20, a.window))
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *_: self.subscribed.set()
        c.on_message = self._on_message
        self.client = c

    def _on_connect(self, client: paho.Client, *_: object) -> None:
        client.subscribe(self.reply_topic, qos=1)

    def send_more(self) -> None:
        """Send images until `window` are unanswered (any thread)."""
        while True:
            with self.lock:
                if self.next >= self.count or self.next - self.received >= self.window:
                    return
                i = self.next
                self.next += 1
                self.sent_at[i] = time.monotonic()
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = str(i).encode()
            self.client.publish(self.topic, self.payload, qos=1, properties=props)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        i = int(bytes(msg.properties.CorrelationData))  # type: ignore[union-attr]
        result = json.loads(msg.payload)
        with self.lock:
            if self.arrived_at[i]:
                return  # a duplicate (at-least-once)
            self.arrived_at[i] = now
            self.node_ms[i] = float(result["timings_ms"]["total"])
            if result["status"] != "ok":
                code = result["error"]["code"]
                self.errors[code] = self.errors.get(code, 0) + 1
            self.received += 1
            finished = self.received >= self.count
        if finished:
            self.done.set()
        else:
            self.send_more()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--window", type=int, default=32, help="images in flight")
    p.add_argument("--topic", required=True)
    p.add_argument("--reply-topic", required=True)
    p.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args()
    s = Sender(a)
    s.client.connect(a.host, a.port, clean_start=True)
    s.client.loop_start()
    if not s.subscribed.wait(30):
        raise SystemExit("sender: not subscribed after 30 s")
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    s.send_more()
    finished = s.done.wait(a.timeout)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    s.client.disconnect()
    s.client.loop_stop()
    if not finished:
        raise SystemExit(f"sender: only {s.received}/{a.count} Results after {a.timeout:g} s")
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(
        json.dumps(
            {
                "sent_at": s.sent_at,
                "arrived_at": s.arrived_at,
                "node_ms": s.node_ms,
                "errors": s.errors,
                "cpu_s": cpu_s,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
