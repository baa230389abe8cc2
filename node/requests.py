"""One image as the node classifies it, and how it is read from a received message.

`ImageRequest` is what the classifier needs (the payload, its id and source, the
timings), the same for an image from MQTT and for a local file (`cellwatch-node
classify`): no topic, property or acknowledgement is in it. `read_request` makes one
from a received message on a decode worker; where the Result goes is the image
route's reply policy (`image_replies`), checked once at the edge.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime

from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.errors import TopicError
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import ReplyPolicy, response_topic
from cellwatch.shared.topics import Topics

IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
Invalid = tuple[ErrorCode, str]
"""Why a request is malformed; it is answered with this error."""


@dataclass(slots=True)
class ImageRequest:
    payload: bytes
    image_id: str
    source: str | None
    """{source} of `images/{source}`; None for the node's direct topic or a file."""
    received_at: datetime
    received_mono: float
    timings: dict[str, float] = field(default_factory=dict)

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.received_mono) * 1000.0


def derive_image_id(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def journal_key(req: ImageRequest) -> str:
    """What the crash journal counts an image under (node/journal.py)."""
    return req.image_id


def read_request(
    message: Message, topics: Topics, node_id: str, received_at: datetime, received_mono: float
) -> tuple[ImageRequest, Invalid | None]:
    """The request in a received image message, and why it is malformed (None: it is
    not): a bad `image_id` user property, or an images topic whose source is not a
    valid name (a refused Response Topic is the reply policy's to say)."""
    payload = message.payload
    given_id = message.user.get("image_id")
    id_ok = given_id is not None and IMAGE_ID_RE.match(given_id) is not None
    invalid: Invalid | None = None
    if given_id is not None and not id_ok:
        invalid = (
            ErrorCode.INVALID_REQUEST,
            "user property image_id must match [A-Za-z0-9_.:-]{1,128}",
        )
    source = None
    if message.topic != topics.node_images(node_id):
        try:
            source = topics.source_of(message.topic)
        except TopicError as exc:
            invalid = (ErrorCode.INVALID_REQUEST, str(exc))
    req = ImageRequest(
        payload=payload,
        # Hashing costs ~0.3 ms for a 5 MP JPEG: only when the sender gave no usable id.
        image_id=given_id if given_id is not None and id_ok else derive_image_id(payload),
        source=source,
        received_at=received_at,
        received_mono=received_mono,
    )
    return req, invalid


def refused_response_topic(topic: str, topics: Topics) -> Invalid:
    return (
        ErrorCode.INVALID_REQUEST,
        f"Response Topic {topic[:200]!r} refused: it must be under {topics.prefix}/replies/USER/",
    )


def image_replies(topics: Topics, node_id: str) -> ReplyPolicy:
    """Where a node answers an image: its Response Topic when that matches
    `replies_filter`; otherwise `results/{source}` (`results/{node_id}` for the node's
    direct topic); nowhere when neither exists (an images topic with an invalid source
    and no usable Response Topic)."""
    allowed = topics.replies_filter()
    direct, direct_results = topics.node_images(node_id), topics.results(node_id)

    def fallback(message: Message) -> str | None:
        if message.topic == direct:
            return direct_results
        try:
            return topics.results(topics.source_of(message.topic))
        except TopicError:
            return None

    return response_topic(lambda message: allowed, fallback)
