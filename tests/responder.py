"""A scripted answering peer for tests of the request/response layer: a real MQTT
client (a node user on the real broker) that sees every request on
`cellwatch/images/+` and answers as the test's `behave` function says."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cellwatch.shared.mqtt import Message, MqttClient, PublishProps
from tests.broker import Broker
from tests.harness import T


@dataclass(frozen=True)
class Seen:
    """A request as the responder received it."""

    topic: str
    payload: bytes
    corr: bytes | None
    response_topic: str | None
    user: dict[str, str]
    expiry: int | None

    @property
    def attempt(self) -> int:
        """The user property `attempt` (a first publish has none)."""
        return int(self.user.get("attempt", "1"))


class Responder:
    """Calls behave(request, responder) on its own thread, in arrival order."""

    def __init__(
        self, broker: Broker, behave: Callable[[Seen, Responder], None], user: str = "node-1"
    ) -> None:
        self.behave = behave
        self.seen: list[Seen] = []
        self.replied = 0
        self.max_unanswered = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Seen | None] = queue.SimpleQueue()
        self.mqtt: MqttClient = broker.connect(
            user,
            subscriptions=[(f, 1) for f in T.lab_images_filters()],
            handler=self._on_message,
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_message(self, msg: Message) -> None:
        seen = Seen(
            msg.topic,
            msg.payload,
            msg.correlation,
            msg.response_topic,
            dict(msg.user),
            msg.expiry_s,
        )
        with self._lock:
            self.seen.append(seen)
            self.max_unanswered = max(self.max_unanswered, len(self.seen) - self.replied)
        self._queue.put(seen)

    def _run(self) -> None:
        while (seen := self._queue.get()) is not None:
            self.behave(seen, self)

    def reply(self, seen: Seen, body: bytes | None = None, corr: bytes | None = None) -> None:
        """Answer on the request's Response Topic (body: the request's payload)."""
        assert seen.response_topic is not None
        props = PublishProps(correlation_data=corr if corr is not None else seen.corr)
        payload = seen.payload if body is None else body
        with self._lock:  # counted before it can arrive (and free a slot)
            self.replied += 1
        assert self.mqtt.publish_wait(seen.response_topic, payload, qos=1, props=props)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)
