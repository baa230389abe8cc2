"""A test-side MQTT requester: publishes images as the `client` user (MQTT v5, response
topic + correlation data) and collects Results by correlation data."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as paho

from cellwatch.shared.mqtt import MqttClient, PublishProps
from cellwatch.shared.schemas import Result
from cellwatch.shared.settings import MqttSettings
from cellwatch.shared.topics import Topics

T = Topics()


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll cond until true; AssertionError naming `what` after timeout (never a timing
    assertion: the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Collector:
    """Subscribes to topics and keeps every message, thread-safely."""

    def __init__(self, settings: MqttSettings, *topics: str, name: str = "collector") -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()
        self.client = MqttClient(
            settings,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            clean_start=True,
            subscriptions=[(t, 1) for t in topics],
        )
        self.client.set_message_handler(self._on_message)
        self.client.connect()

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def on(self, topic: str) -> list[paho.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()


class Requester:
    """Sends images with a Response Topic under `cellwatch/replies/{user}/...`."""

    def __init__(self, settings: MqttSettings, user: str = "client") -> None:
        self.reply_topic = T.replies(user, f"t-{uuid.uuid4().hex[:8]}")
        self.results: dict[bytes, list[Result]] = {}
        self.raw: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.client = MqttClient(
            settings,
            client_id=f"req-{uuid.uuid4().hex[:8]}",
            clean_start=True,
            subscriptions=[(self.reply_topic, 1)],
        )
        self.client.set_message_handler(self._on_message)
        self.client.connect()

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        result = Result.model_validate_json(msg.payload)
        with self._lock:
            self.raw.append(msg)
            self.results.setdefault(bytes(corr or b""), []).append(result)

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
    ) -> bytes:
        corr = correlation if correlation is not None else f"c{next(self._ids)}".encode()
        props = PublishProps(
            response_topic=response_topic or self.reply_topic,
            correlation_data=corr,
            message_expiry_s=expiry_s,
            user=[("image_id", image_id)] if image_id else (),
        )
        ok = self.client.publish_wait(topic or T.images(source), payload, qos=1, props=props)
        assert ok, "broker did not accept the image"
        return corr

    def result(self, corr: bytes, timeout: float = 30.0) -> Result:
        wait_for(lambda: corr in self.results, timeout, f"result for {corr!r}")
        with self._lock:
            return self.results[corr][0]

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
        corr = self.send(
            payload, source=source, topic=topic, correlation=correlation, image_id=image_id
        )
        return self.result(corr)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def close(self) -> None:
        self.client.disconnect()
