"""`Rpc`: correlated requests over one MqttClient (see the package docstring)."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cellwatch.shared.errors import MqttError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.mqtt import Message, MqttClient, PacketTooLargeError, PublishProps
from cellwatch.shared.rpc.edge import Route, raw
from cellwatch.shared.rpc.errors import (
    PacketTooLarge,
    PublishRefused,
    RequestTimeout,
    RpcClosed,
    RpcError,
)
from cellwatch.shared.rpc.values import (
    ATTEMPT_PROPERTY,
    Parse,
    Reply,
    RequestPolicy,
    RpcStats,
    Sink,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

REMEMBER_FINISHED = 65536
"""Correlation Data of finished requests kept to tell a duplicate from a stranger."""


@dataclass(eq=False)
class _Request:
    topic: str
    payload: bytes
    props: PublishProps
    policy: RequestPolicy
    parse: Parse[Any]
    future: Future[Reply[Any]] | None
    sink: tuple[Sink, object] | None
    """Where the outcome goes instead of a future: (queue, the caller's tag)."""
    started: float
    deadline: float
    corrs: dict[bytes, int] = field(default_factory=dict)
    """Correlation Data of each attempt -> attempt number."""
    attempts: int = 0
    next_retry: float | None = None
    first: bytes = b""
    """Correlation Data of the first attempt."""
    timer: int = -1
    """Sequence number of this request's live heap entry (older entries are stale)."""
    done: bool = False


@dataclass(frozen=True)
class Ticket:
    """A request made with `Rpc.send`."""

    rpc: Rpc
    _req: _Request = field(repr=False)

    def cancel(self) -> None:
        """Abandon it (frees its window slot; no outcome is put into the sink)."""
        self.rpc._abandon(self._req)


class Rpc:
    """Correlated requests over one MqttClient; answers arrive on `reply_topic`.

    Route the reply topic's messages to `on_message` (or let `attach()` install it
    as the client's only handler). `close()` fails what is still pending.
    """

    def __init__(
        self,
        mqtt: MqttClient,
        reply_topic: str,
        *,
        window: int = 64,
        name: str = "rpc",
        qos: int = 1,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.mqtt = mqtt
        self.reply_topic = reply_topic
        self.window = window
        self.name = name
        self.qos = qos
        self._lock = threading.Lock()
        self._slots = threading.Condition(self._lock)
        self._by_corr: dict[bytes, _Request] = {}
        self._finished: OrderedDict[bytes, bool] = OrderedDict()
        """Correlation Data of finished requests -> whether they had an answer."""
        self._handover: Handoff[tuple[_Request, Reply[Any] | RpcError] | None] = Handoff(
            name=f"{name} answers"
        )
        """Outcomes for the dispatcher to put into futures; None: the timers changed."""
        self._timers: list[tuple[float, int, _Request]] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._closed = False
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "sent",
                "retries",
                "answered",
                "duplicates",
                "late",
                "unknown",
                "malformed",
                "refused",
                "timeouts",
            ),
            0,
        )
        self._thread = threading.Thread(target=self._dispatch, name=f"{name}-rpc", daemon=True)
        self._thread.start()

    def attach(self) -> Rpc:
        """Make on_message the MqttClient's message handler; returns self."""
        self.mqtt.set_message_handler(self.on_message)
        return self

    def route(self) -> Route[bytes]:
        """The edge route of the reply topic (for a client with other routes too)."""
        return Route(
            self.reply_topic,
            raw,
            lambda inbound: self.on_message(inbound.message),
            max_bytes=None,
            qos=self.qos,
            name=f"{self.name} replies",
        )

    # -- caller side ------------------------------------------------------------------
    def submit(
        self,
        topic: str,
        payload: bytes,
        parse: Parse[T],
        policy: RequestPolicy,
        *,
        user: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        message_expiry_s: int | None = None,
    ) -> Future[Reply[T]]:
        """Publish a request once a window slot is free; the future gets its Reply or
        an RpcError. Cancelling the future abandons the request and frees its slot.

        `response_topic`, `correlation` and `message_expiry_s` override the defaults
        for protocol tests (a fixed `correlation` must be unique; it is used for the
        first attempt).
        """
        future: Future[Reply[T]] = Future()
        req = self._start(
            topic,
            payload,
            parse,
            policy,
            user=user,
            content_type=content_type,
            response_topic=response_topic,
            correlation=correlation,
            message_expiry_s=message_expiry_s,
            future=future,
        )
        future.add_done_callback(lambda f: self._abandon(req) if f.cancelled() else None)
        self._publish(req, req.first)
        return future

    def send(
        self,
        topic: str,
        payload: bytes,
        parse: Parse[T],
        policy: RequestPolicy,
        *,
        sink: Sink,
        tag: object,
        user: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
    ) -> Ticket:
        """Like submit(), for callers that handle many requests: the outcome, `(tag,
        Reply or RpcError)`, is put into `sink` by whichever thread finishes the request
        (no future, no dispatcher hop: the cheapest path, for batches)."""
        req = self._start(
            topic, payload, parse, policy, user=user, content_type=content_type, sink=(sink, tag)
        )
        self._publish(req, req.first)
        return Ticket(self, req)

    def _start(
        self,
        topic: str,
        payload: bytes,
        parse: Parse[Any],
        policy: RequestPolicy,
        *,
        user: Sequence[tuple[str, str]],
        content_type: str | None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        message_expiry_s: int | None = None,
        future: Future[Reply[Any]] | None = None,
        sink: tuple[Sink, object] | None = None,
    ) -> _Request:
        """Wait for a window slot and register the request (its first attempt)."""
        wait_until = time.monotonic() + policy.timeout_s
        with self._lock:
            while self._in_flight >= self.window and not self._closed:
                left = wait_until - time.monotonic()
                if left <= 0:
                    raise RequestTimeout(
                        f"no free slot among {self.window} requests in flight within "
                        f"{policy.timeout_s:g} s",
                        attempts=0,
                        waited_s=policy.timeout_s,
                        connected=self.mqtt.connected,
                    )
                self._slots.wait(left)
            if self._closed:
                raise RpcClosed(f"{self.name}: closed")
            self._in_flight += 1
            self._counts["requests"] += 1
            started = time.monotonic()
            req = _Request(
                topic=topic,
                payload=payload,
                props=PublishProps(
                    response_topic=response_topic or self.reply_topic,
                    content_type=content_type,
                    message_expiry_s=message_expiry_s,
                    user=tuple(user),
                ),
                policy=policy,
                parse=parse,
                future=future,
                sink=sink,
                started=started,
                deadline=started + policy.timeout_s,
            )
            req.first = self._next_attempt(req, correlation)
        return req

    def call(
        self,
        topic: str,
        payload: bytes,
        parse: Parse[T],
        policy: RequestPolicy,
        *,
        user: Sequence[tuple[str, str]] = (),
        content_type: str | None = None,
    ) -> Reply[T]:
        """submit() and wait for the Reply; raises the request's RpcError."""
        future = self.submit(topic, payload, parse, policy, user=user, content_type=content_type)
        return future.result()

    def stats(self) -> RpcStats:
        with self._lock:
            return RpcStats(**self._counts, in_flight=self._in_flight)

    def close(self) -> None:
        """Fail every pending request with RpcClosed and stop the dispatcher."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = {id(r): r for r in self._by_corr.values()}
            for req in pending.values():
                self._finish(req, RpcClosed(f"{self.name}: closed before an answer came"))
            self._slots.notify_all()
        self._handover.put(None)
        self._thread.join(timeout=10)
        for item in self._handover.close():
            if item is not None:
                self._resolve(*item)

    # -- network thread -------------------------------------------------------------------
    def on_message(self, msg: Message) -> None:
        """An answer arrived: parse, match, hand over. Never blocks."""
        corr = msg.correlation
        with self._lock:
            req = self._by_corr.get(corr) if corr is not None else None
            if req is None:
                answered = self._finished.get(corr) if corr is not None else None
                if answered is not None:
                    self._counts["duplicates" if answered else "late"] += 1
                else:
                    self._counts["unknown"] += 1
                    log.warning(
                        "%s: dropped an answer on %s with Correlation Data it did not send",
                        self.name,
                        msg.topic,
                    )
                return
            attempt = req.corrs[corr]  # type: ignore[index]
        outcome: Reply[Any] | RpcError
        try:
            value = req.parse(msg)
        except RpcError as exc:
            outcome = exc
        except ValueError as exc:  # pydantic's ValidationError is one
            with self._lock:
                self._counts["malformed"] += 1
            log.warning("%s: dropped a malformed answer on %s: %s", self.name, msg.topic, exc)
            return
        else:
            outcome = Reply(
                value=value,
                attempt=attempt,
                attempts=req.attempts,
                round_trip_s=time.monotonic() - req.started,
            )
        with self._lock:
            if req.done:
                answered = self._finished.get(corr)  # type: ignore[arg-type]
                self._counts["late" if answered is False else "duplicates"] += 1
                return
            if isinstance(outcome, Reply):
                self._counts["answered"] += 1
            self._finish(req, outcome)

    def _on_published(self, req: _Request, ok: bool) -> None:
        """PUBACK (network thread, or the publisher's thread if it came first)."""
        if ok:
            return
        with self._lock:
            self._counts["refused"] += 1
            if not req.done:
                self._finish(
                    req,
                    PublishRefused(
                        f"the broker refused the publish to {req.topic} "
                        f"(user {self.mqtt.settings.username!r}; check the ACL)"
                    ),
                )

    # -- internals (lock held) --------------------------------------------------------------
    def _next_attempt(self, req: _Request, correlation: bytes | None = None) -> bytes:
        corr = correlation if correlation is not None else os.urandom(16)  # as random as uuid4
        req.attempts += 1
        req.corrs[corr] = req.attempts
        self._by_corr[corr] = req
        now = time.monotonic()
        retry = req.policy.retry_after_s
        if retry is not None and req.attempts < req.policy.max_attempts:
            req.next_retry = now + retry
        else:
            req.next_retry = None
        self._schedule(req)
        return corr

    def _schedule(self, req: _Request) -> None:
        when = req.deadline if req.next_retry is None else min(req.deadline, req.next_retry)
        req.timer = next(self._seq)
        heapq.heappush(self._timers, (when, req.timer, req))
        if self._timers[0][2] is req:
            self._handover.put(None)  # the dispatcher's next wake-up moved earlier
        if len(self._timers) > 4 * self._in_flight + 1024:
            # Finished requests leave their entries behind until they come due: drop them.
            self._timers = [t for t in self._timers if not t[2].done and t[1] == t[2].timer]
            heapq.heapify(self._timers)

    def _retire(self, req: _Request, answered: bool) -> None:
        req.done = True
        req.payload = b""  # the image may be large and the heap keeps req until its timer
        for corr in req.corrs:
            self._by_corr.pop(corr, None)
            self._finished[corr] = answered
        while len(self._finished) > REMEMBER_FINISHED:
            self._finished.popitem(last=False)
        self._in_flight -= 1
        self._slots.notify()

    def _finish(self, req: _Request, outcome: Reply[Any] | RpcError) -> None:
        self._retire(req, answered=not isinstance(outcome, (RequestTimeout, RpcClosed)))
        if req.sink is not None:
            queue, tag = req.sink
            queue.put((tag, outcome))  # unbounded: never blocks
        else:
            self._handover.put((req, outcome))

    def _abandon(self, req: _Request) -> None:
        """The caller cancelled the future."""
        with self._lock:
            if not req.done:
                self._retire(req, answered=False)

    # -- publishing (no lock held) ------------------------------------------------------------
    def _publish(self, req: _Request, corr: bytes) -> None:
        with self._lock:
            if req.done:
                return  # closed or cancelled in the meantime
            payload = req.payload
            attempt = req.corrs[corr]
        left = max(0.0, req.deadline - time.monotonic())
        expiry = req.props.message_expiry_s
        props = PublishProps(
            response_topic=req.props.response_topic,
            correlation_data=corr,
            message_expiry_s=expiry if expiry is not None else max(1, math.ceil(left)),
            content_type=req.props.content_type,
            user=(*req.props.user, (ATTEMPT_PROPERTY, str(attempt)))
            if attempt > 1
            else req.props.user,
        )
        try:
            self.mqtt.publish(
                req.topic,
                payload,
                qos=self.qos,
                props=props,
                on_done=lambda ok: self._on_published(req, ok),
            )
        except MqttError as exc:
            too_large = isinstance(exc, PacketTooLargeError)
            error = PacketTooLarge(str(exc)) if too_large else RpcError(str(exc))
            with self._lock:
                if not req.done:
                    self._finish(req, error)
            return
        with self._lock:
            self._counts["sent"] += 1
            if attempt > 1:
                self._counts["retries"] += 1

    # -- dispatcher thread ----------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                wait = max(0.0, self._timers[0][0] - now) if self._timers else None
            try:
                item = self._handover.get(wait)
            except queue.Empty:
                item = None
            if item is not None:
                self._resolve(*item)
            due: list[tuple[int, _Request]] = []
            with self._lock:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, seq, req = heapq.heappop(self._timers)
                    due.append((seq, req))
            for seq, req in due:
                self._on_timer(req, seq)

    @staticmethod
    def _resolve(req: _Request, outcome: Reply[Any] | RpcError) -> None:
        assert req.future is not None
        try:
            if isinstance(outcome, RpcError):
                req.future.set_exception(outcome)
            else:
                req.future.set_result(outcome)
        except InvalidStateError:
            pass  # cancelled by the caller in the meantime

    def _on_timer(self, req: _Request, seq: int) -> None:
        with self._lock:
            if req.done or seq != req.timer:
                return
            now = time.monotonic()
            if now >= req.deadline:
                self._counts["timeouts"] += 1
                connected = self.mqtt.connected
                self._finish(
                    req,
                    RequestTimeout(
                        f"no answer within {req.policy.timeout_s:g} s "
                        f"({req.attempts} attempt{'s' if req.attempts != 1 else ''}"
                        f"{'' if connected else '; not connected to the broker'})",
                        attempts=req.attempts,
                        waited_s=now - req.started,
                        connected=connected,
                    ),
                )
                return
            if req.next_retry is None or now < req.next_retry:
                self._schedule(req)  # woken early (float rounding): wait again
                return
            if not self.mqtt.connected:
                # paho sends the queued publish after reconnecting: wait, don't pile up.
                assert req.policy.retry_after_s is not None
                req.next_retry = now + req.policy.retry_after_s
                self._schedule(req)
                return
            corr = self._next_attempt(req)
        log.info("%s: no answer on %s yet; attempt %d", self.name, req.topic, req.attempts)
        self._publish(req, corr)
