"""Chunk transfers over `Rpc`, one wire format in both directions (DESIGN.md, Rollout).

The chunk: the raw bytes as the payload, user properties `offset` (where they
start), `sha256` (of these bytes) and `total` (the file's size; a download needs it,
an upload chunk may omit it), or an empty payload with `error` and `message`.
`chunk_properties` writes them and `read_chunk` reads them (the hash is checked
there: a chunk that fails it is dropped and sent or asked for again). A receiver
writes chunks through a `PartFile`: strictly in order into `{dest}.part`, so its
size is always the last good offset and an interrupted transfer resumes there.

- Download (`Download`, the node's bundle fetch): the downloader asks for `length`
  bytes at `offset` (its own request body), up to `window` requests in flight; the
  server answers with a chunk. It may send fewer bytes than asked (the hub clamps to
  its `max_chunk_bytes`): the downloader advances by what it received, asks for the
  rest, and asks for chunks of the size it learned from then on. Chunks are appended
  in order (later ones wait in memory). When the expected size is known (from the
  manifest), the server's `total` must equal it. An error answer `not_ready` (a site
  relay that is still fetching the file: it holds a request a few seconds first)
  is no failure: the range is asked for again NOT_READY_AGAIN_S later, for as long
  as the server says so (the caller's `cancelled`, and the hub's rollout timeout,
  bound the wait).
- Upload (`Upload`, the operator's bundle push; any peer's upload): the sender sends
  chunks from its resume offset, up to `window` in flight, each with the receiver's
  naming properties (which file); the receiver appends each to its PartFile and
  answers with the next offset it expects, in order.
"""

from __future__ import annotations

import hashlib
import os
import queue
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.mqtt import Message
from cellwatch.shared.rpc import (
    Outcome,
    Parse,
    RemoteError,
    Reply,
    RequestPolicy,
    Rpc,
    RpcError,
    Sink,
    Ticket,
)

POLL_S = 0.25
"""How often a waiting download checks whether it was cancelled."""
NOT_READY_AGAIN_S = 0.5
"""A range the server answered `not_ready` is asked for again this much later (the
server held the request before answering; this only bounds a server that does not)."""
OFFSET, TOTAL, SHA256 = "offset", "total", "sha256"
ERROR, MESSAGE = "error", "message"
UserProperties = tuple[tuple[str, str], ...]
A = TypeVar("A")


class TransferError(CellwatchError):
    """The transfer cannot finish: no progress, a refusal, or a peer that contradicts
    itself or the manifest."""


class TransferCancelled(CellwatchError):
    """`cancelled()` said stop."""


@dataclass(frozen=True)
class Chunk:
    offset: int
    total: int | None
    """The file's size (None: the sender did not say)."""
    data: bytes


def chunk_properties(offset: int, data: bytes, total: int | None = None) -> UserProperties:
    """The user properties of a chunk of data at offset (of a file of total bytes)."""
    props = [(OFFSET, str(offset))]
    if total is not None:
        props.append((TOTAL, str(total)))
    props.append((SHA256, hashlib.sha256(data).hexdigest()))
    return tuple(props)


def error_properties(code: str, message: str) -> UserProperties:
    """The user properties of an error answer (its payload is empty)."""
    return ((ERROR, code), (MESSAGE, message))


def read_chunk(msg: Message) -> Chunk:
    """A chunk; RemoteError for an error answer, ValueError if malformed (including a
    chunk whose SHA-256 does not match)."""
    props = msg.user
    if ERROR in props:
        raise RemoteError(props[ERROR], props.get(MESSAGE, ""))
    try:
        offset = int(props[OFFSET])
        total = int(props[TOTAL]) if TOTAL in props else None
    except (KeyError, ValueError) as exc:
        raise ValueError(f"chunk without a valid offset/total: {dict(props)}") from exc
    if offset < 0 or (total is not None and total < 0):
        raise ValueError(f"negative offset or total: {dict(props)}")
    data = msg.payload
    if hashlib.sha256(data).hexdigest() != props.get(SHA256):
        raise ValueError(f"chunk at {offset} failed its SHA-256")
    return Chunk(offset, total, data)


def read_sized_chunk(msg: Message) -> Chunk:
    """A download's chunk: read_chunk, and `total` is required."""
    chunk = read_chunk(msg)
    if chunk.total is None:
        raise ValueError(f"chunk at {chunk.offset} without a total")
    return chunk


@dataclass
class PartFile:
    """A file received in order: `{dest}.part` until it is complete, then `dest`."""

    dest: Path
    total: int | None = None

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    def received(self) -> int:
        """Bytes that arrived (the whole file once complete)."""
        for path in (self.dest, self.part):
            try:
                return path.stat().st_size
            except FileNotFoundError:
                continue
        return 0

    def append(self, offset: int, data: bytes) -> int:
        """Write data at offset, which must be the bytes received so far; completes the
        file when it reaches `total`. Returns the new size; TransferError otherwise (an
        OSError, e.g. a full disk, passes)."""
        if self.dest.exists():
            raise TransferError(f"{self.dest.name} is complete already")
        have = self.received()
        if offset != have:
            raise TransferError(f"{self.dest.name}: expected offset {have}, got {offset}")
        end = offset + len(data)
        if self.total is not None and end > self.total:
            raise TransferError(f"{self.dest.name}: {end} bytes is more than its size {self.total}")
        with self.part.open("ab") as out:
            out.write(data)
        if end == self.total:
            self.complete()
        return end

    def complete(self) -> None:
        """Make the part file the file: on disk first (fsync), then renamed."""
        with self.part.open("ab") as out:
            os.fsync(out.fileno())
        os.replace(self.part, self.dest)


RequestFor = Callable[[int, int], tuple[str, bytes]]
"""(offset, length) -> (topic, payload) of the request for that range."""


@dataclass
class Download:
    """One file, downloaded with up to `window` requests in flight."""

    rpc: Rpc
    request_for: RequestFor
    dest: Path
    chunk_bytes: int
    window: int
    policy: RequestPolicy
    """Per chunk request: re-ask after retry_after_s; give up after timeout_s."""
    expected_size: int | None = None
    max_size: int | None = None
    cancelled: Callable[[], bool] = lambda: False
    progress: Callable[[int, int], None] = lambda done, total: None
    user: UserProperties = ()
    """User properties of every request (a site relay marks its own)."""
    received: int = 0
    """Bytes that arrived (hash-checked), including any later discarded."""

    def run(self) -> int:
        """Download to dest (resuming dest.part); returns the file's size."""
        file = PartFile(self.dest, self.expected_size)
        done = file.part.stat().st_size if file.part.exists() else 0
        if self.expected_size is not None and done > self.expected_size:
            file.part.unlink()  # longer than the file can be: start again
            done = 0
        total = self.expected_size
        chunk = self.chunk_bytes
        next_offset = done
        gaps: deque[tuple[int, int]] = deque()  # ranges asked for but only partly answered
        later: list[tuple[float, int, int]] = []  # (when, offset, length): not ready yet
        sink: Sink = queue.SimpleQueue()
        pending: dict[int, tuple[int, Ticket]] = {}  # offset -> (length, ticket)
        ready: dict[int, bytes] = {}
        try:
            while total is None or done < total:
                if self.cancelled():
                    raise TransferCancelled(f"download of {self.dest.name} cancelled")
                now = time.monotonic()
                for again in [x for x in later if x[0] <= now]:
                    later.remove(again)
                    gaps.appendleft((again[1], again[2]))
                while len(pending) < self.window:
                    if gaps:
                        offset, length = gaps.popleft()
                        if length > chunk:
                            gaps.appendleft((offset + chunk, length - chunk))
                            length = chunk
                    elif total is None and (pending or later):
                        break  # learn the size from the first answer before fanning out
                    elif total is not None and next_offset >= total:
                        break
                    else:
                        offset = next_offset
                        length = chunk if total is None else min(chunk, total - offset)
                        next_offset += length
                    topic, payload = self.request_for(offset, length)
                    ticket = self.rpc.send(
                        topic,
                        payload,
                        read_sized_chunk,
                        self.policy,
                        sink=sink,
                        tag=offset,
                        user=self.user,
                    )
                    pending[offset] = (length, ticket)
                for offset, outcome in _drain(sink, POLL_S):
                    length, _ = pending.pop(offset)
                    if isinstance(outcome, RemoteError) and outcome.code == ApiErrorCode.NOT_READY:
                        later.append((time.monotonic() + NOT_READY_AGAIN_S, offset, length))
                        continue
                    got, size = self._chunk(outcome, offset, length, total)
                    if total is None:
                        total = file.total = self._check_size(size)
                        next_offset = min(next_offset, total)
                    n = len(got.data)
                    if n < length and offset + n < total:
                        chunk = min(chunk, max(n, 1))  # the server's limit
                        gaps.append((offset + n, length - n))
                    ready[offset] = got.data
                while done in ready:
                    data = ready.pop(done)
                    done = file.append(done, data)
                    self.progress(done, total or 0)
                    if not data:
                        break
        finally:
            for _, ticket in pending.values():
                ticket.cancel()
        if not self.dest.exists():  # the part file was complete before we began
            file.complete()
        return done

    def _chunk(
        self, outcome: Outcome, offset: int, length: int, total: int | None
    ) -> tuple[Chunk, int]:
        """The chunk of an answer, checked against the request, and the file's size."""
        if isinstance(outcome, RemoteError):
            raise TransferError(f"{self.dest.name}: refused: {outcome}") from outcome
        if isinstance(outcome, RpcError):
            raise TransferError(f"{self.dest.name} at byte {offset}: {outcome}") from outcome
        got: Chunk = outcome.value
        size = got.total
        assert size is not None  # read_sized_chunk
        self.received += len(got.data)
        name = self.dest.name
        if got.offset != offset:
            raise TransferError(f"{name}: asked for byte {offset}, got byte {got.offset}")
        if total is not None and size != total:
            raise TransferError(f"{name}: the server says {size} bytes, expected {total}")
        if len(got.data) > length:
            raise TransferError(f"{name}: asked for {length} bytes at {offset}, got more")
        if not got.data and offset < size:
            raise TransferError(f"{name}: empty chunk at {offset} of {size}")
        return got, size

    def _check_size(self, total: int) -> int:
        if self.max_size is not None and total > self.max_size:
            raise TransferError(f"{self.dest.name}: {total} bytes is over {self.max_size}")
        return total


@dataclass
class Upload(Generic[A]):
    """One file sent from `start`, up to `window` chunks in flight; the receiver
    answers every chunk (in order), and `confirm` checks each answer."""

    rpc: Rpc
    topic: str
    naming: UserProperties
    """The receiver's properties that say which file the chunks belong to."""
    path: Path
    start: int
    size: int
    chunk_bytes: int
    window: int
    parse: Parse[A]
    policy: RequestPolicy
    """Per chunk (one attempt: a chunk must not arrive twice out of order)."""
    confirm: Callable[[Future[Reply[A]]], object]
    """Waits for one answer; raises the caller's error for a refusal or no answer."""
    progress: Callable[[int], None] = field(default=lambda sent: None)
    """Bytes of this file the receiver confirmed (since `start`)."""

    def run(self) -> int:
        """Send the file; returns the bytes sent."""
        inflight: deque[tuple[Future[Reply[A]], int]] = deque()
        sent = 0
        with self.path.open("rb") as f:
            f.seek(self.start)
            position = self.start
            while position < self.size or inflight:
                while position < self.size and len(inflight) < self.window:
                    data = f.read(min(self.chunk_bytes, self.size - position))
                    user = (*self.naming, *chunk_properties(position, data, self.size))
                    future = self.rpc.submit(self.topic, data, self.parse, self.policy, user=user)
                    inflight.append((future, len(data)))
                    position += len(data)
                future, length = inflight.popleft()
                try:
                    self.confirm(future)
                except BaseException:
                    for rest, _ in inflight:
                        rest.cancel()
                    raise
                sent += length
                self.progress(position - self.start - sum(n for _, n in inflight))
        return sent


def _drain(sink: Sink, timeout: float) -> list[tuple[int, Outcome]]:
    """The outcomes in sink: waits up to timeout for the first, takes the rest there."""
    try:
        got = [sink.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            got.append(sink.get_nowait())
        except queue.Empty:
            return [(cast(int, tag), outcome) for tag, outcome in got]


def chunk_policy(retry_after_s: float, stall_timeout_s: float) -> RequestPolicy:
    """Re-ask for a chunk every retry_after_s; give up after stall_timeout_s."""
    attempts = max(1, int(stall_timeout_s // retry_after_s))
    return RequestPolicy(
        timeout_s=stall_timeout_s, retry_after_s=retry_after_s, max_attempts=attempts
    )
