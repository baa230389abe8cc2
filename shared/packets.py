"""The values that cross cellwatch's MQTT edge, and nothing that connects.

A received message as cellwatch sees it (`Message`, made by `received()`, the one place
that reads a paho message's properties), the publish properties it sets
(`PublishProps`), a Will, the size of the PUBLISH packet paho sends (to stay under the
broker's Maximum Packet Size), and the errors of the MQTT client (shared/mqtt.py, which
re-exports all of these). No paho type leaves this module except through
`PublishProps.to_paho()` and `publish_packet_size`, which shared/mqtt.py uses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cellwatch.shared.errors import MqttError

AckToken = Callable[[], None]
"""Acknowledges one received message (once its work is done). Bound to the connection
it arrived on: after a reconnect it does nothing, because the broker delivers the
message again on the new connection."""


def no_ack() -> None:
    """The ack token of a message that needs none (QoS 0, automatic acks, tests)."""


_NO_USER: Mapping[str, str] = MappingProxyType({})


@dataclass(slots=True, eq=False)
class Message:
    """A received message as cellwatch sees it (built by `received()`)."""

    topic: str
    payload: bytes
    qos: int = 1
    retained: bool = False
    correlation: bytes | None = None
    """Correlation Data, echoed on a reply."""
    response_topic: str | None = None
    expiry_s: int | None = None
    """Message Expiry Interval left when the broker delivered it."""
    user: Mapping[str, str] = field(default_factory=lambda: _NO_USER)
    """User properties (the last value of a repeated key wins)."""
    ack: AckToken = no_ack


def received(msg: paho.MQTTMessage, ack: AckToken = no_ack) -> Message:
    """The Message of a paho message: the one function that reads a received message's
    properties (Response Topic, Correlation Data, Message Expiry, user properties)."""
    payload = msg.payload
    if not isinstance(payload, bytes):  # paho slices its receive bytearray
        payload = bytes(payload)
    props = msg.properties
    if props is None:
        return Message(msg.topic, payload, msg.qos, bool(msg.retain), ack=ack)
    rt = getattr(props, "ResponseTopic", None)
    corr = getattr(props, "CorrelationData", None)
    expiry = getattr(props, "MessageExpiryInterval", None)
    pairs = getattr(props, "UserProperty", None)
    return Message(
        msg.topic,
        payload,
        msg.qos,
        bool(msg.retain),
        bytes(corr) if corr is not None else None,
        str(rt) if rt else None,
        int(expiry) if expiry is not None else None,
        {str(k): str(v) for k, v in pairs} if pairs else _NO_USER,
        ack,
    )


MessageHandler = Callable[[Message], None]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether topic (or a filter, taken level by level) falls under topic_filter."""
    return bool(paho.topic_matches_sub(topic_filter, topic))


PublishCallback = Callable[[bool], None]
"""Called with True once the broker acknowledged a publish, False if it refused it (or,
for QoS 0, if the connection dropped before it was sent). It runs on paho's network
thread, or on the publishing thread when the acknowledgement beat `publish()` back:
it must never block."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class PublishProps:
    """MQTT v5 publish properties cellwatch uses."""

    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry_s: int | None = None
    content_type: str | None = None
    user: Sequence[tuple[str, str]] = field(default_factory=tuple)

    def size_bound(self) -> int:
        """An upper bound of the packed properties' size, without packing them."""
        size = 4 + 5  # property length (varint) + Message Expiry Interval
        for value in (self.response_topic, self.content_type):
            if value is not None:
                size += 3 + len(value.encode())
        if self.correlation_data is not None:
            size += 3 + len(self.correlation_data)
        for key, value in self.user:
            size += 5 + len(key.encode()) + len(value.encode())
        return size

    def to_paho(self) -> Properties | None:
        props = blank_properties(PacketTypes.PUBLISH)
        used = False
        if self.response_topic is not None:
            props.ResponseTopic, used = self.response_topic, True
        if self.correlation_data is not None:
            props.CorrelationData, used = self.correlation_data, True
        if self.message_expiry_s is not None:
            props.MessageExpiryInterval, used = self.message_expiry_s, True
        if self.content_type is not None:
            props.ContentType, used = self.content_type, True
        if self.user:
            props.UserProperty, used = list(self.user), True
        return props if used else None


class PacketTooLargeError(MqttError):
    """A publish larger than the broker's Maximum Packet Size (not sent)."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure (e.g. not authorized)."""


class BrokerUnreachable(MqttError):
    """The first connection found no broker: its port refused the TCP connection, or
    its name does not resolve (said at once, not after connect_timeout_s)."""


_BLANK: dict[int, Properties] = {}


def blank_properties(packet_type: int) -> Properties:
    """An empty Properties: a shallow copy of a blank one (paho builds its lookup
    tables in every __init__, which cost more than the rest of a publish's props;
    the copies share those tables, which paho only reads)."""
    blank = _BLANK.get(packet_type)
    if blank is None:
        blank = _BLANK[packet_type] = Properties(packet_type)  # type: ignore[no-untyped-call]
    return copy.copy(blank)


def packet_size(topic: str, payload: bytes, qos: int, props: PublishProps | None) -> int:
    """Size in bytes of the MQTT v5 PUBLISH packet paho sends for these arguments."""
    return publish_packet_size(topic, payload, qos, props.to_paho() if props else None)


def publish_packet_size(topic: str, payload: bytes, qos: int, props: Properties | None) -> int:
    """packet_size, for paho's Properties."""
    packed_props: bytes = props.pack() if props is not None else b"\x00"  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + len(packed_props) + len(payload)
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining
