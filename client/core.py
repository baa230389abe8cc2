"""The one implementation under `Client` and `AsyncClient`.

It connects as the lab user with a persistent session, receives every Result on
`{prefix}/replies/{username}/{token}` (token: a hash of the client id, which the
nodes that see the Response Topic must not learn), and sends each image through the shared
request/response layer (`cellwatch.shared.rpc`): fresh Correlation Data per
publish, a retry after `retry_after_s` with the same `image_id` and user property
`attempt=N`, Message Expiry set to the time left, up to `max_attempts` publishes
within `timeout_s`; the first Result wins, duplicates and Results this client did
not ask for are counted and dropped.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Generator, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cellwatch.client.answer import Answer
from cellwatch.client.config import ClientSettings
from cellwatch.client.errors import (
    BrokerUnavailable,
    ClientError,
    NotAuthorized,
    PayloadTooLarge,
    Timeout,
)
from cellwatch.client.feed import End, Feed
from cellwatch.client.inputs import image_id_for, read
from cellwatch.shared.errors import MqttError
from cellwatch.shared.mqtt import ConnectRefused, Message, MqttClient, PublishProps, packet_size
from cellwatch.shared.rpc import (
    ATTEMPT_PROPERTY,
    Outcome,
    PacketTooLarge,
    PublishRefused,
    Reply,
    RequestPolicy,
    RequestTimeout,
    Rpc,
    RpcError,
    RpcStats,
    Sink,
    Ticket,
)
from cellwatch.shared.schemas import Result
from cellwatch.shared.topics import Topics, check_name

log = logging.getLogger(__name__)

REPLY_TOKEN_HEX = 24
MAX_IN_FLIGHT = 1024
"""Requests in flight per client, over all callers (each holds its image in memory)."""

Image = bytes | Path | str
"""An image: its encoded bytes, or the path of a file holding them."""

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


def reply_token(client_id: str) -> str:
    """The last level of the client's reply topic: stable for a client id (its
    persistent session keeps the subscription), and not the id itself, which every node
    would otherwise read in the Response Topic and could use to take the session over."""
    return hashlib.sha256(f"cellwatch reply\0{client_id}".encode()).hexdigest()[:REPLY_TOKEN_HEX]


def parse_result(msg: Message) -> Result:
    """Network thread: a Result, or ValueError (counted as malformed and dropped)."""
    return Result.model_validate_json(msg.payload)


@dataclass(frozen=True)
class Prepared:
    """An image read and checked, ready to publish."""

    input: str
    image_id: str | None
    """Sent as user property `image_id`; None for bytes: the node derives the same id
    from the payload on every attempt (the first 16 hex digits of its SHA-256)."""
    payload: bytes
    topic: str
    content_type: str | None

    @property
    def user(self) -> tuple[tuple[str, str], ...]:
        return (("image_id", self.image_id),) if self.image_id is not None else ()


class Core:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        mqtt = settings.mqtt
        assert mqtt.username is not None  # ClientSettings fills in the default
        self.username = mqtt.username
        self.topics = Topics(mqtt.topic_prefix)
        # A random id per run: Mosquitto 2.0 lets any account take over any client id,
        # so another lab must not be able to guess it (deploy/PRODUCTION.md, threat model).
        self.client_id = mqtt.client_id or f"cellwatch-client-{uuid.uuid4().hex}"
        self.reply_topic = self.topics.replies(self.username, reply_token(self.client_id))
        self.policy = RequestPolicy(
            timeout_s=settings.timeout_s,
            retry_after_s=settings.retry_after_s,
            max_attempts=settings.max_attempts,
        )
        self.mqtt = MqttClient(
            mqtt,
            client_id=self.client_id,
            clean_start=False,
            subscriptions=[(self.reply_topic, 1)],
        )
        self.rpc = Rpc(self.mqtt, self.reply_topic, window=MAX_IN_FLIGHT, name="client").attach()
        self._topic_of: dict[tuple[str | None, str | None], str] = {}

    # -- connection -------------------------------------------------------------------
    def connect(self) -> None:
        """Connect; NotAuthorized (a wrong user or password) or BrokerUnavailable (at
        once for a closed port or an unknown host name)."""
        s = self.settings.mqtt
        try:
            self.mqtt.connect()
        except ConnectRefused as exc:
            raise NotAuthorized(f"{exc} (user {self.username!r}: check the password)") from exc
        except MqttError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        log.info(
            "client %s: Results on %s (%s:%s)", self.mqtt.log_name, self.reply_topic, s.host, s.port
        )

    def close(self) -> None:
        """Disconnect and drop the reply session (nothing will ask for its Results)."""
        self.mqtt.disconnect(session_expiry_s=0)
        self.rpc.close()

    def stats(self) -> RpcStats:
        return self.rpc.stats()

    # -- requests -----------------------------------------------------------------------
    def prepare(
        self,
        image: Image,
        *,
        index: int = 0,
        source: str | None = None,
        image_id: str | None = None,
        node: str | None = None,
    ) -> Prepared:
        """Read and check one image (InputError, PayloadTooLarge); nothing is sent.
        node: send to that node's direct topic (default: settings.node, else shared)."""
        if isinstance(image, bytes):
            name, payload, content_type = f"bytes#{index}", image, None
            stem = None
        else:
            path = Path(image)
            payload = read(path)
            name, stem = str(path), path.stem
            content_type = CONTENT_TYPES.get(path.suffix.lower())
        if image_id is None and stem is not None:
            image_id = image_id_for(stem, payload)
        prepared = Prepared(name, image_id, payload, self._topic(source, node), content_type)
        self._check_size(prepared)
        return prepared

    def _topic(self, source: str | None, node: str | None = None) -> str:
        """The images topic of this account and scope (source), for every node or only
        `node` (TopicError if a name is not valid). A lab publishes only under its own
        name (the broker's ACL): `images/{username}[/{source}]`, or
        `nodes/{node}/images/{username}[/{source}]`."""
        node = node or self.settings.node
        src = source or self.settings.source
        topic = self._topic_of.get((src, node))
        if topic is None:
            scope = check_name(src, "source") if src is not None else None
            if node is None:
                topic = self.topics.lab_images(self.username, scope)
            else:
                topic = self.topics.node_lab_images(check_name(node, "node"), self.username, scope)
            self._topic_of[(src, node)] = topic
        return topic

    def _check_size(self, p: Prepared) -> None:
        """PayloadTooLarge if the publish (with the largest attempt number) would not fit
        in the broker's Maximum Packet Size."""
        limit = self.mqtt.max_packet_size
        if limit is None:
            return
        props = PublishProps(
            response_topic=self.reply_topic,
            correlation_data=bytes(16),
            message_expiry_s=2**32 - 1,
            content_type=p.content_type,
            user=(*p.user, (ATTEMPT_PROPERTY, str(self.policy.max_attempts))),
        )
        if len(p.payload) + len(p.topic.encode()) + 9 + props.size_bound() <= limit:
            return  # fits for sure, without packing the properties
        size = packet_size(p.topic, p.payload, 1, props)
        if size > limit:
            raise PayloadTooLarge(
                f"{p.input}: {len(p.payload)} bytes do not fit in the broker's maximum packet "
                f"size ({limit} bytes for the whole message); not sent"
            )

    def _policy(self, timeout: float | None) -> RequestPolicy:
        policy = self.policy
        if timeout is None:
            return policy
        return RequestPolicy(
            timeout_s=timeout,
            retry_after_s=min(policy.retry_after_s or timeout, timeout),
            max_attempts=policy.max_attempts,
        )

    def submit(self, p: Prepared, timeout: float | None = None) -> Future[Reply[Result]]:
        """Publish one image (blocks while MAX_IN_FLIGHT are in flight)."""
        try:
            return self.rpc.submit(
                p.topic,
                p.payload,
                parse_result,
                self._policy(timeout),
                user=p.user,
                content_type=p.content_type,
            )
        except RpcError as exc:
            raise self.translate(p, exc) from exc

    def send(self, p: Prepared, sink: Sink, tag: object, timeout: float | None = None) -> Ticket:
        """Publish one image; its outcome goes into sink as (tag, Reply or RpcError)."""
        try:
            return self.rpc.send(
                p.topic,
                p.payload,
                parse_result,
                self._policy(timeout),
                sink=sink,
                tag=tag,
                user=p.user,
                content_type=p.content_type,
            )
        except RpcError as exc:
            raise self.translate(p, exc) from exc

    def answer(self, p: Prepared, future: Future[Reply[Result]]) -> Answer:
        """Wait for the future; an Answer with the Result or the client error."""
        try:
            outcome: Outcome = future.result()
        except RpcError as exc:
            outcome = exc
        return self.answer_of(p, outcome)

    def answer_of(self, p: Prepared, outcome: Outcome) -> Answer:
        if isinstance(outcome, RpcError):
            attempts = outcome.attempts if isinstance(outcome, RequestTimeout) else 0
            return Answer(
                p.input, p.image_id or "", error=self.translate(p, outcome), attempts=attempts
            )
        return Answer(
            p.input,
            outcome.value.image_id,
            result=outcome.value,
            attempts=outcome.attempts,
            round_trip_s=outcome.round_trip_s,
        )

    def translate(self, p: Prepared, exc: RpcError) -> ClientError:
        s = self.settings.mqtt
        if isinstance(exc, RequestTimeout):
            if not exc.connected:
                return BrokerUnavailable(
                    f"{p.input}: no connection to the broker {s.host}:{s.port} "
                    f"(lost, not back within {exc.waited_s:.0f} s)"
                )
            return Timeout(
                f"{p.input}: no Result within {exc.waited_s:.1f} s "
                f"({exc.attempts} attempt{'s' if exc.attempts != 1 else ''}); "
                "is a node running?",
                exc.attempts,
            )
        if isinstance(exc, PublishRefused):
            return NotAuthorized(
                f"the broker refused images on {p.topic} from user {self.username!r} "
                "(check the user and the broker's ACL)"
            )
        if isinstance(exc, PacketTooLarge):
            return PayloadTooLarge(f"{p.input}: {exc}")
        return ClientError(f"{p.input}: {exc}")

    # -- many ----------------------------------------------------------------------------
    def many(
        self,
        images: Iterable[Image],
        *,
        source: str | None = None,
        concurrency: int | None = None,
        timeout: float | None = None,
        node: str | None = None,
    ) -> Generator[Answer, None, None]:
        """Answers in completion order, at most `concurrency` images in flight; files
        are read just before they are sent. Input errors become Answers too.

        A feeder thread takes the inputs, so an Answer is yielded as soon as it comes
        even while the iterable waits for its next image (a generator fed by a
        microscope or a steady stream). An exception from the iterable is raised here
        as soon as it happens (the images still in flight are cancelled)."""
        limit = concurrency or self.settings.concurrency
        if limit < 1:
            raise ValueError("concurrency must be >= 1")
        feed = Feed(self, images, limit, source=source, timeout=timeout, node=node)
        feed.start()
        try:
            while True:
                item = feed.sink.get()
                tag, outcome = item
                if isinstance(tag, End):
                    if tag.error is not None:
                        raise tag.error
                    return
                yield feed.answer(cast(int, tag), cast(Outcome | ClientError, outcome))
        finally:
            feed.close()
