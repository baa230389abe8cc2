"""Publisher process for bench/node_throughput.py: sends one JPEG N times at QoS 1.

Each image carries a Response Topic and its index as Correlation Data; the
benchmark process collects the Results. Runs as its own process so publishing
does not share a Python interpreter (GIL) with the collector.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellwatch.shared.mqtt import MqttClient, PublishProps  # noqa: E402
from cellwatch.shared.settings import MqttSettings  # noqa: E402
from cellwatch.shared.topics import Topics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--reply-topic", required=True)
    p.add_argument("--start-index", type=int, default=0)
    a = p.parse_args()
    payload = a.image.read_bytes()
    settings = MqttSettings(host="127.0.0.1", port=a.port, username="client", password=a.password)
    client = MqttClient(settings, client_id=f"bench-pub-{a.start_index}", clean_start=True)
    client.connect()
    topic = Topics().images("bench")
    t0 = time.monotonic()
    last = 0
    for i in range(a.start_index, a.start_index + a.count):
        props = PublishProps(response_topic=a.reply_topic, correlation_data=str(i).encode())
        last = client.publish(topic, payload, qos=1, props=props)
    # the last publish acknowledged means all were (the broker acks in order)
    client.publish_wait(topic + "-done", b"", qos=1)
    print(
        f"published {a.count} images in {time.monotonic() - t0:.2f} s (last mid {last})", flush=True
    )
    client.disconnect()


if __name__ == "__main__":
    main()
