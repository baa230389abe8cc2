"""What retained images cost the broker: its memory with and without them.

    python bench/retained.py [--count 10] [--mb 5]

Starts the project's Mosquitto (tests/broker.py: the production mosquitto.conf and
ACL), then, as the lab account `client-labA`, publishes `--count` images of `--mb` MB
each to its own images topics (`cellwatch/images/client-labA/scope-N`) without the
retain flag, then the same with it, and prints the broker's resident memory (VmRSS)
after each step, after a subscriber (a node, through the shared subscription) got
them replayed, and after they were cleared (an empty retained message each, as the
operator's remedy in deploy/README.md does). Mosquitto 2.0 keeps a retained message
until someone clears it: nothing in its configuration or ACL refuses the retain flag
for some topics or accounts (`retain_available false` refuses it everywhere, and the
hub and nodes need it for statuses, desired models and revocations).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.chaos import cpu_name
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.topics import Topics
from tests.broker import Broker

T = Topics()
LAB = "client-labA"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10, help="images")
    parser.add_argument("--mb", type=float, default=5.0, help="size of each image, MB")
    args = parser.parse_args()
    payload = bytes(range(256)) * int(args.mb * 1024 * 1024 / 256)
    topics = [T.lab_images(LAB, f"scope-{i}") for i in range(args.count)]
    with tempfile.TemporaryDirectory(prefix="cw-retained-") as tmp:
        broker = Broker.create(Path(tmp) / "broker", nodes=["node-1"], clients=[LAB])
        try:
            pid = broker.pid
            assert pid is not None
            lab = broker.connect(LAB)
            print(f"{cpu_name()}; Mosquitto {broker.executable}; {args.count} x {args.mb:g} MB")
            print(f"broker RSS at start: {rss_mb(pid):.1f} MB")
            for topic in topics:
                assert lab.publish_wait(topic, payload, timeout=60)
            print(f"after {args.count} images without the retain flag: {rss_mb(pid):.1f} MB")
            for topic in topics:
                assert lab.publish_wait(topic, payload, retain=True, timeout=60)
            print(f"after {args.count} retained images: {rss_mb(pid):.1f} MB")
            got = threading.Semaphore(0)
            node = MqttClient(
                broker.settings("node-1"),
                client_id="bench-retained-node",
                clean_start=True,
                subscriptions=[(f, 1) for f in T.lab_images_shared_filters()],
            )
            node.set_message_handler(lambda msg: got.release())
            node.connect()
            for _ in topics:
                if not got.acquire(timeout=60):
                    raise RuntimeError("the retained images were not replayed")
            print(f"after replaying them to a new subscriber: {rss_mb(pid):.1f} MB")
            node.disconnect()
            operator = broker.connect("operator")
            for topic in topics:  # the remedy: an empty retained message clears one
                assert operator.publish_wait(topic, b"", retain=True)
            print(f"after clearing them (operator, empty retained): {rss_mb(pid):.1f} MB")
        finally:
            broker.close_clients()
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
