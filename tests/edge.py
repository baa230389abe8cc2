"""Driving the edge's routes without a broker: a Publisher that records what a
handler published, and received messages made by hand (shared/rpc/edge.py)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cellwatch.shared.mqtt import Message, PublishCallback, PublishProps


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: PublishProps | None

    @property
    def user(self) -> dict[str, str]:
        return dict(self.props.user) if self.props is not None else {}

    @property
    def correlation(self) -> bytes | None:
        return self.props.correlation_data if self.props is not None else None


@dataclass
class Recorder:
    """A Publisher that keeps every publish and acknowledges it at once (or, with
    `refuse`, says the broker refused it)."""

    published: list[Published] = field(default_factory=list)
    refuse: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        props: PublishProps | None = None,
        on_done: PublishCallback | None = None,
    ) -> object:
        with self.lock:
            self.published.append(Published(topic, payload, qos, retain, props))
        if on_done is not None:
            on_done(not self.refuse)
        return None

    def on(self, topic: str) -> list[Published]:
        with self.lock:
            return [p for p in self.published if p.topic == topic]


@dataclass
class Acks:
    """Counts the acknowledgements of hand-made messages."""

    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self) -> None:
        with self.lock:
            self.count += 1


def message(
    topic: str,
    payload: bytes,
    *,
    correlation: bytes | None = None,
    response_topic: str | None = None,
    user: Sequence[tuple[str, str]] = (),
    retained: bool = False,
    expiry_s: int | None = None,
    ack: Acks | None = None,
) -> Message:
    """A received message as the edge would hand it over."""
    return Message(
        topic,
        payload,
        retained=retained,
        correlation=correlation,
        response_topic=response_topic,
        expiry_s=expiry_s,
        user=dict(user),
        ack=ack if ack is not None else Acks(),
    )
