"""One image request as the node sees it, parsed from an MQTT message.

MQTT stays at the edge: the pipeline acknowledges a request by calling its `ack`
token, without knowing message ids, QoS or connections.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import paho.mqtt.client as paho

from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.errors import TopicError
from cellwatch.shared.mqtt import user_properties
from cellwatch.shared.schemas import utcnow
from cellwatch.shared.topics import Topics

IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
AckToken = Callable[[], None]


def _no_ack() -> None:
    pass


@dataclass
class ImageRequest:
    payload: bytes
    image_id: str
    source: str | None
    """{source} of `images/{source}`; None for the node's direct topic."""
    response_topic: str | None
    correlation_data: bytes | None
    received_at: datetime
    received_mono: float
    deadline_mono: float | None = None
    ack: AckToken = _no_ack
    """Tells the broker the image is done with (called once its Result is safe)."""
    direct: bool = False
    """Arrived on the node's own `nodes/{node_id}/images` topic."""
    invalid: tuple[ErrorCode, str] | None = None
    """Set when the request itself is malformed; answered with an error Result."""
    timings: dict[str, float] = field(default_factory=dict)
    crashes: int = 0
    """Abnormal stops of this node while this image was in progress (node/journal.py)."""
    answered: bool = False
    journaled: bool = False
    release: Callable[[], None] | None = None
    """Frees the one-suspect-at-a-time slot once this (suspect) image is done."""

    @property
    def expired(self) -> bool:
        return self.deadline_mono is not None and time.monotonic() > self.deadline_mono

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.received_mono) * 1000.0


def derive_image_id(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def parse_message(
    msg: paho.MQTTMessage, topics: Topics, node_id: str, ack: AckToken
) -> ImageRequest:
    """Build an ImageRequest; malformed parts mark it `invalid` rather than raising.

    A Response Topic outside `{prefix}/replies/` is dropped (the error Result goes to
    the default results topic instead): a node writes Results nowhere else."""
    props = msg.properties
    response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
    now_mono = time.monotonic()
    payload = bytes(msg.payload)
    user = user_properties(msg)
    given_id = user.get("image_id")
    id_ok = given_id is not None and IMAGE_ID_RE.match(given_id) is not None
    req = ImageRequest(
        payload=payload,
        # Hashing costs ~0.3 ms for a 5 MP JPEG: only when the sender gave no usable id.
        image_id=given_id if given_id is not None and id_ok else derive_image_id(payload),
        source=None,
        response_topic=str(response_topic) if response_topic else None,
        correlation_data=bytes(correlation) if correlation is not None else None,
        received_at=utcnow(),
        received_mono=now_mono,
        deadline_mono=now_mono + float(expiry) if expiry is not None else None,
        ack=ack,
    )
    if given_id is not None and not id_ok:
        req.invalid = (
            ErrorCode.INVALID_REQUEST,
            "user property image_id must match [A-Za-z0-9_.:-]{1,128}",
        )
    if topics.is_node_images(msg.topic, node_id):
        req.direct = True
    else:
        try:
            req.source = topics.source_of(msg.topic)
        except TopicError as exc:
            req.invalid = (ErrorCode.INVALID_REQUEST, str(exc))
    if req.response_topic is not None and not topics.is_reply_topic(req.response_topic):
        req.invalid = (
            ErrorCode.INVALID_REQUEST,
            f"Response Topic {req.response_topic[:200]!r} refused: it must be under "
            f"{topics.prefix}/replies/USER/",
        )
        req.response_topic = None
    return req
