"""The request layer's values: a request's RequestPolicy, its Reply, the counters, and the
types a batch caller uses (Sink, Outcome)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc.errors import RpcError

T = TypeVar("T")

ATTEMPT_PROPERTY = "attempt"
"""User property carrying the attempt number (2, 3, ...) of every re-publish; the
first publish goes without it."""


@dataclass(frozen=True)
class RequestPolicy:
    """How long one request may take and how often it is sent."""

    timeout_s: float
    retry_after_s: float | None = None
    """Publish again when no answer came within this long (None: never)."""
    max_attempts: int = 1

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.retry_after_s is not None and not self.retry_after_s > 0:
            raise ValueError("retry_after_s must be > 0")


@dataclass(frozen=True)
class Reply(Generic[T]):
    """The first answer to a request."""

    value: T
    """What `parse` made of the answer."""
    attempt: int
    """Which attempt's Correlation Data the answer carried (1 = the first publish)."""
    attempts: int
    """Publishes made for this request when the answer came."""
    round_trip_s: float
    """From the first publish to the answer."""


@dataclass(frozen=True)
class RpcStats:
    requests: int = 0
    sent: int = 0
    """Publishes, retries included."""
    retries: int = 0
    answered: int = 0
    duplicates: int = 0
    """Answers to a request that already had one (dropped)."""
    late: int = 0
    """Answers to a request that had already failed, e.g. timed out (dropped)."""
    unknown: int = 0
    """Answers with Correlation Data this Rpc never sent (dropped)."""
    malformed: int = 0
    """Answers `parse` rejected (dropped; the request waits for another)."""
    refused: int = 0
    timeouts: int = 0
    in_flight: int = 0


Parse = Callable[[Message], T]
"""Reads an answer: its value, RemoteError for an error answer, ValueError if malformed."""
Outcome = Reply[Any] | RpcError
Sink = queue.SimpleQueue[tuple[object, Outcome]]
"""Where `Rpc.send` puts each outcome, tagged with the caller's tag."""
