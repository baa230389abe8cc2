"""The responder half of the request layer: one MQTT edge for every inbound message.

A `Route` is declared once: the topic filter (and the subscription, when it differs,
as for a shared subscription), how to read the payload (a pydantic model's
`model_validate_json`, or `raw` bytes), a byte cap, a reply policy, the handler, and
who acknowledges the message. `Edge.add` registers it with paho's
`message_callback_add` and subscribes. For every message, on paho's network thread,
the edge:

1. leaves a message to a more specific route when one matches its topic exactly
   (`hub/api/upload` wins over `hub/api/+`; the broker sends it once, on the wider
   subscription);
2. acknowledges and drops an empty payload when the route says it clears a retained
   message (`empty_clears`);
3. refuses a payload over the cap, or one the payload reader rejects (ValueError, of
   which pydantic's ValidationError is one): the route's `on_rejected` gets a
   `Rejected` (to count it, or to answer with an error; it is acknowledged as the
   route's handler's messages are), or, without one, the edge logs one line and
   acknowledges it;
4. hands the handler an `Inbound`: the typed `body`, the `message` (topic, Correlation
   Data, user properties, ...), `ack()` and `reply()`; and acknowledges the message
   after the handler returns unless the route leaves that to the handler
   (`Acks.HANDLER`: the handler hands the Inbound on and calls `ack()` once its work
   is safe). Handlers run on the network thread: they validate and hand over, never
   wait.

Replies. A route's `ReplyPolicy` decides, from the message, where its replies go
(`ReplyTo`): `no_reply`, or `response_topic(scope, fallback)`: the message's Response
Topic when it lies in the filter `scope(message)` builds (the one check is
`topics.response_topic_allowed`; the scope may depend on the message's own topic, so
a reply can be held to the account or node that asked), otherwise `fallback(message)`,
recording the refused topic so the handler can say why. `reply(payload)` publishes
there with the request's Correlation Data echoed; no message id, QoS or connection
generation ever leaves the edge (the ack token carries them).

The domain receives Inbound values and publishes through a `Publisher` (the
MqttClient, or a recorder in tests), so it never imports paho and can be driven
without a broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from pydantic import ValidationError

from cellwatch.shared.base import first_problem
from cellwatch.shared.mqtt import (
    Message,
    MqttClient,
    PublishCallback,
    PublishProps,
    topic_matches,
)
from cellwatch.shared.topics import response_topic_allowed

log = logging.getLogger(__name__)

B = TypeVar("B")
B_co = TypeVar("B_co", covariant=True)


class Publisher(Protocol):
    """What publishes for the domain: the MqttClient, or a recorder in tests."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        props: PublishProps | None = None,
        on_done: PublishCallback | None = None,
    ) -> object: ...


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where the replies to one message go, as its route's policy decided."""

    topic: str | None
    """None: nowhere (the reply is logged and dropped)."""
    refused: str | None = None
    """A Response Topic the sender gave that the policy refused (for the handler to
    say so in its answer)."""


NOWHERE = ReplyTo(None)
ReplyPolicy = Callable[[Message], ReplyTo]
Scope = Callable[[Message], str | None]
"""The filter a Response Topic must match, built from the request (None: none may)."""


def no_reply(message: Message) -> ReplyTo:
    """The policy of routes that never answer (statuses, reports, retained state)."""
    return NOWHERE


def response_topic(scope: Scope, fallback: Scope | None = None) -> ReplyPolicy:
    """Reply on the request's Response Topic when it lies in `scope(message)`;
    otherwise on `fallback(message)` (None: nowhere), noting the refused topic."""

    def policy(message: Message) -> ReplyTo:
        rt = message.response_topic
        if rt is not None:
            allowed = scope(message)
            if allowed is not None and response_topic_allowed(rt, allowed):
                return ReplyTo(rt)
        return ReplyTo(fallback(message) if fallback is not None else None, refused=rt)

    return policy


def raw(payload: bytes) -> bytes:
    """The payload reader of routes that take the bytes as they are."""
    return payload


class Acks(Enum):
    AFTER_HANDLER = "after_handler"
    """The edge acknowledges the message once the handler returned (or raised)."""
    HANDLER = "handler"
    """The handler (or whoever it hands the Inbound to) calls `ack()` when done."""


class Problem(Enum):
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"


class Delivery:
    """A received message with its acknowledgement and its reply channel."""

    __slots__ = ("_policy", "_publisher", "_reply_to", "message")

    def __init__(self, message: Message, publisher: Publisher, policy: ReplyPolicy) -> None:
        self.message = message
        self._publisher = publisher
        self._policy = policy
        self._reply_to: ReplyTo | None = None

    @property
    def topic(self) -> str:
        return self.message.topic

    @property
    def reply_to(self) -> ReplyTo:
        """Where `reply` publishes (the route's policy, asked once)."""
        if self._reply_to is None:
            self._reply_to = self._policy(self.message)
        return self._reply_to

    def ack(self) -> None:
        """Tell the broker the message is done with (a no-op for QoS 0, for automatic
        acks, and after a reconnect: the broker then delivers it again)."""
        self.message.ack()

    def reply(
        self,
        payload: bytes,
        *,
        user: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
        on_done: PublishCallback | None = None,
    ) -> bool:
        """Publish payload (QoS 1) where the policy says, with the request's
        Correlation Data echoed; False (nothing sent, on_done not called) when there
        is nowhere to reply. MqttError if the publish is refused before sending."""
        topic = self.reply_to.topic
        if topic is None:
            return False
        props = PublishProps(
            correlation_data=self.message.correlation, content_type=content_type, user=user
        )
        self._publisher.publish(topic, payload, qos=1, props=props, on_done=on_done)
        return True


class Inbound(Delivery, Generic[B_co]):
    """A message that passed its route's checks, with its typed body."""

    __slots__ = ("body",)

    def __init__(
        self,
        message: Message,
        body: B_co,
        publisher: Publisher,
        policy: ReplyPolicy = no_reply,
    ) -> None:
        super().__init__(message, publisher, policy)
        self.body = body


class Rejected(Delivery):
    """A message its route refused: over the byte cap, or not a valid payload."""

    __slots__ = ("problem", "reason")

    def __init__(
        self,
        message: Message,
        problem: Problem,
        reason: str,
        publisher: Publisher,
        policy: ReplyPolicy = no_reply,
    ) -> None:
        super().__init__(message, publisher, policy)
        self.problem = problem
        self.reason = reason
        """One line: `payload is N bytes, over the M-byte limit`, or `field: reason`."""


@dataclass(frozen=True)
class Route(Generic[B]):
    """One kind of inbound message (see the module docstring)."""

    filter: str
    """The topic filter the handler serves."""
    body: Callable[[bytes], B]
    """Reads the payload: `Model.model_validate_json`, or `raw`."""
    handler: Callable[[Inbound[B]], object]
    max_bytes: int | None
    """Larger payloads are rejected unread (None: the broker's limit only)."""
    reply: ReplyPolicy = no_reply
    on_rejected: Callable[[Rejected], None] | None = None
    acks: Acks = Acks.AFTER_HANDLER
    empty_clears: bool = False
    """An empty payload clears a retained message: acknowledged and ignored."""
    qos: int = 1
    subscription: str | None = None
    """What to subscribe to when it is not `filter` (a shared subscription)."""
    name: str = ""
    """For logs (default: the filter)."""

    @property
    def label(self) -> str:
        return self.name or self.filter


class Edge:
    """The inbound side of one MqttClient: its routes (see the module docstring)."""

    def __init__(self, mqtt: MqttClient) -> None:
        self.mqtt = mqtt
        self._exact: set[str] = set()
        """Filters without wildcards: a wildcard route leaves their topics to them."""
        self._subscribed: list[str] = []

    def add(self, route: Route[Any]) -> None:
        """Register route (before connecting, so that no message misses it).

        A filter another route's subscription covers is not subscribed again: the
        broker would send each message once per matching subscription."""
        wildcard = "+" in route.filter or "#" in route.filter
        if not wildcard:
            self._exact.add(route.filter)
        self.mqtt.route(route.filter, self._deliverer(route, wildcard))
        subscription = route.subscription or route.filter
        if any(topic_matches(s, subscription) for s in self._subscribed):
            return
        for covered in [s for s in self._subscribed if topic_matches(subscription, s)]:
            self._subscribed.remove(covered)
            self.mqtt.unsubscribe(covered)
        self._subscribed.append(subscription)
        self.mqtt.subscribe(subscription, route.qos)

    def _deliverer(self, route: Route[B], wildcard: bool) -> Callable[[Message], None]:
        exact, publisher, name = self._exact, self.mqtt, self.mqtt.log_name

        def on_message(message: Message) -> None:
            if wildcard and message.topic in exact:
                return  # the exact route has it
            deliver(route, message, publisher, name)

        return on_message


def deliver(route: Route[B], message: Message, publisher: Publisher, name: str = "edge") -> None:
    """What the edge does with one message of a route (steps 2-4 of the module
    docstring); tests call it directly to drive a route without a broker."""
    payload = message.payload
    if not payload and route.empty_clears:
        message.ack()
        return
    cap, policy = route.max_bytes, route.reply
    if cap is not None and len(payload) > cap:
        reason = f"payload is {len(payload)} bytes, over the {cap}-byte limit"
        _reject(route, Rejected(message, Problem.TOO_LARGE, reason, publisher, policy), name)
        return
    try:
        value = route.body(payload)
    except ValueError as exc:  # pydantic's ValidationError is one
        reason = first_problem(exc) if isinstance(exc, ValidationError) else str(exc)
        _reject(route, Rejected(message, Problem.MALFORMED, reason, publisher, policy), name)
        return
    inbound = Inbound(message, value, publisher, policy)
    if route.acks is not Acks.AFTER_HANDLER:
        route.handler(inbound)
        return
    try:
        route.handler(inbound)
    finally:
        message.ack()


def _reject(route: Route[Any], rejected: Rejected, name: str) -> None:
    """on_rejected, or one log line; then the ack, as for the handler."""
    try:
        if route.on_rejected is not None:
            route.on_rejected(rejected)
        else:
            log.warning(
                "%s: %s on %s dropped: %s", name, route.label, rejected.topic, rejected.reason
            )
    finally:
        if route.acks is Acks.AFTER_HANDLER or route.on_rejected is None:
            rejected.ack()
