"""Test-side MQTT helpers: `Collector` keeps what arrives on some topics; `Requester`
publishes images as the `client` user through the shared request/response layer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from cellwatch.shared.mqtt import Message, MqttClient
from cellwatch.shared.rpc import Reply, RequestPolicy, Rpc, RpcStats
from cellwatch.shared.schemas import Latency, Result, Telemetry, utcnow
from cellwatch.shared.settings import MqttSettings
from cellwatch.shared.topics import Topics

T = Topics()
PROBE = RequestPolicy(timeout_s=600.0)
"""One attempt; the tests bound each wait themselves."""
Sent = Future[Reply[Result]]


def quiet_telemetry(node_id: str, rss_mb: float = 1.0) -> Telemetry:
    """A valid Telemetry of an idle node (what fake nodes and markers send)."""
    return Telemetry(
        node_id=node_id,
        ts=utcnow(),
        window_s=10.0,
        processed=0,
        errors=0,
        throughput_ips=0.0,
        latency_ms=Latency(p50=0.0, p95=0.0, p99=0.0),
        inflight=0,
        rss_mb=rss_mb,
    )


def parse_result(msg: Message) -> Result:
    return Result.model_validate_json(msg.payload)


def wait_for(
    cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition", every: float = 0.02
) -> None:
    """Poll cond every `every` s until true; AssertionError naming `what` after timeout
    (never a timing assertion: the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class Collector:
    """Subscribes to topics and keeps every message, thread-safely."""

    def __init__(self, settings: MqttSettings, *topics: str, name: str = "collector") -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.client = MqttClient(
            settings,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            clean_start=True,
            subscriptions=[(t, 1) for t in topics],
        )
        self.client.set_message_handler(self._on_message)
        self.client.connect()

    def _on_message(self, msg: Message) -> None:
        with self._lock:
            self.messages.append(msg)

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()


class Requester:
    """A protocol probe on the shared request/response layer (`cellwatch.shared.rpc`):
    sends images (to `images/{user}/{source}`) with a Response Topic under
    `cellwatch/replies/{user}/...`, one attempt each (a retry would hide a node that
    loses an image), and exposes what tests need to control: the topic, Correlation
    Data, Message Expiry, image_id and Response Topic."""

    def __init__(self, settings: MqttSettings, user: str = "client") -> None:
        self.user = user
        self.reply_topic = T.replies(user, f"t-{uuid.uuid4().hex[:8]}")
        self.client = MqttClient(
            settings,
            client_id=f"req-{uuid.uuid4().hex[:8]}",
            clean_start=True,
            subscriptions=[(self.reply_topic, 1)],
        )
        self.rpc = Rpc(self.client, self.reply_topic, window=10_000, name="requester").attach()
        self.client.connect()

    def send(
        self,
        payload: bytes,
        *,
        source: str = "scope-1",
        topic: str | None = None,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
        image_id: str | None = None,
        response_topic: str | None = None,
    ) -> Sent:
        sent = self.rpc.submit(
            topic or T.lab_images(self.user, source),
            payload,
            parse_result,
            PROBE,
            user=[("image_id", image_id)] if image_id else (),
            response_topic=response_topic,
            correlation=correlation,
            message_expiry_s=expiry_s,
        )
        return sent

    def result(self, sent: Sent, timeout: float = 30.0) -> Result:
        try:
            return sent.result(timeout).value
        except FutureTimeout:
            raise AssertionError(f"timed out waiting for a result ({timeout:g} s)") from None

    def request(
        self,
        payload: bytes,
        *,
        source: str = "scope-1",
        topic: str | None = None,
        correlation: bytes | None = None,
        image_id: str | None = None,
    ) -> Result:
        """Send one image and wait for its Result."""
        sent = self.send(
            payload, source=source, topic=topic, correlation=correlation, image_id=image_id
        )
        return self.result(sent)

    def count(self) -> int:
        """Requests answered so far."""
        return self.rpc.stats().answered

    def stats(self) -> RpcStats:
        return self.rpc.stats()

    def close(self) -> None:
        self.client.disconnect()
        self.rpc.close()
