"""One image as the node classifies it, and how it is read from a received message.

`ImageRequest` is what the classifier needs (the payload, its id, who sent it, the
timings), the same for an image from MQTT and for a local file (`cellwatch-node
classify`): no topic, property or acknowledgement is in it. `read_request` makes one
from a received message; its payload's SHA-256 (the derived image id and the crash
journal's key) is computed on first use, on a decode worker, never on paho's network
thread.

Who sent an image is the account its topic names (`Topics.origin_of`:
`images/{account}[/{scope}]` or `nodes/{node_id}/images/{account}[/{scope}]`), which
the broker's ACL lets only that account write (DESIGN.md, Trust). Its Result goes to
the request's Response Topic only under `replies/{that account}/`, otherwise to
`results/{that account}` (`image_replies`, the image route's reply policy, checked
once at the edge), and the crash journal counts it under that account and its
content (`journal_key`), never under a name the sender chose.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime

from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.errors import TopicError
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import ReplyPolicy, response_topic
from cellwatch.shared.topics import Topics

IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
DERIVED_ID_HEX = 16
"""Hex digits of the payload's SHA-256 in an image id the node derives."""
Invalid = tuple[ErrorCode, str]
"""Why a request is malformed; it is answered with this error."""


class ImageRequest:
    """One image to classify (see the module docstring)."""

    __slots__ = (
        "_digest",
        "given_id",
        "payload",
        "received_at",
        "received_mono",
        "scope",
        "source",
        "timings",
    )

    def __init__(
        self,
        payload: bytes,
        *,
        image_id: str | None,
        source: str | None,
        received_at: datetime,
        received_mono: float,
        scope: str | None = None,
    ) -> None:
        self.payload = payload
        self.given_id = image_id
        """The sender's image id (a valid one), or None: derived from the payload."""
        self.source = source
        """The account that sent it (its images topic names it); None for a file."""
        self.scope = scope
        """The scope (microscope) its topic names, if any."""
        self.received_at = received_at
        self.received_mono = received_mono
        self.timings: dict[str, float] = {}
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """The payload's SHA-256 (hex), computed once, when first asked (~0.3 ms for a
        5 MP JPEG: a decode worker asks, never the network thread)."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.payload).hexdigest()
        return self._digest

    @property
    def image_id(self) -> str:
        return self.given_id if self.given_id is not None else self.digest[:DERIVED_ID_HEX]

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.received_mono) * 1000.0


def journal_key(req: ImageRequest) -> str:
    """What the crash journal (node/journal.py) counts an image under: its content,
    scoped to the account that sent it (`account:sha256`). Never the image id: that is
    the sender's choice, and ALL-IDB's file names are the same in every lab, so another
    lab's different image of the same name would be taken for a poison image."""
    return f"{req.source or ''}:{req.digest}"


def sender(message: Message, topics: Topics, node_id: str) -> str | None:
    """The account an images topic names; None if it names no valid one."""
    try:
        return topics.account_of(message.topic, node_id)
    except TopicError:
        return None


def read_request(
    message: Message, topics: Topics, node_id: str, received_at: datetime, received_mono: float
) -> tuple[ImageRequest, Invalid | None]:
    """The request in a received image message, and why it is malformed (None: it is
    not): a bad `image_id` user property, or an images topic whose account or scope is
    not a valid name (a refused Response Topic is the reply policy's to say). Hashes
    nothing."""
    given_id = message.user.get("image_id")
    invalid: Invalid | None = None
    if given_id is not None and IMAGE_ID_RE.match(given_id) is None:
        invalid = (
            ErrorCode.INVALID_REQUEST,
            "user property image_id must match [A-Za-z0-9_.:-]{1,128}",
        )
        given_id = None
    account, scope = sender(message, topics, node_id), None
    try:
        scope = topics.origin_of(message.topic, node_id).scope
    except TopicError as exc:
        invalid = (ErrorCode.INVALID_REQUEST, str(exc))
    req = ImageRequest(
        message.payload,
        image_id=given_id,
        source=account,
        scope=scope,
        received_at=received_at,
        received_mono=received_mono,
    )
    return req, invalid


def refused_response_topic(topic: str, topics: Topics, account: str | None) -> Invalid:
    where = topics.replies_filter(account)[:-1] if account else f"{topics.prefix}/replies/ACCOUNT/"
    return (
        ErrorCode.INVALID_REQUEST,
        f"Response Topic {topic[:200]!r} refused: it must be under {where} (the account "
        "that sent the image)",
    )


def image_replies(topics: Topics, node_id: str) -> ReplyPolicy:
    """Where a node answers an image (see the module docstring): its Response Topic
    when that lies under `replies/{account}/`, otherwise `results/{account}`, for the
    account its topic names; nowhere when the topic names no valid account."""

    def scope(message: Message) -> str | None:
        account = sender(message, topics, node_id)
        return topics.replies_filter(account) if account is not None else None

    def fallback(message: Message) -> str | None:
        account = sender(message, topics, node_id)
        return topics.results(account) if account is not None else None

    return response_topic(scope, fallback)
