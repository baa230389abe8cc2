"""What the fleet page's tests feed a hub: telemetry (valid, or as raw bytes from a
scripted node) and a string that would run if the page failed to escape it."""

from __future__ import annotations

from cellwatch.hub.service import HubService
from cellwatch.shared.schemas import Latency, Telemetry, utcnow
from tests.harness import T
from tests.hub.scripted_nodes import FakeNode

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=1">'


def telemetry(node_id: str, **changes: object) -> Telemetry:
    values: dict[str, object] = {
        "node_id": node_id,
        "ts": utcnow(),
        "window_s": 10.0,
        "processed": 120,
        "errors": 3,
        "errors_by_code": {"undecodable_image": 2, "expired": 1},
        "throughput_ips": 12.5,
        "latency_ms": Latency(p50=41.0, p95=77.5, p99=90.25),
        "inflight": 4,
        "model_version": "1.0.0",
        "rss_mb": 512.5,
    }
    values.update(changes)
    return Telemetry.model_validate(values)


def send_telemetry(node: FakeNode, payload: bytes) -> None:
    assert node.mqtt.publish_wait(T.telemetry(node.node_id), payload, qos=1)


def stored_telemetry(hub: HubService, node_id: str) -> dict[str, object] | None:
    rec = hub.db.node(node_id)
    return rec.telemetry if rec is not None else None
