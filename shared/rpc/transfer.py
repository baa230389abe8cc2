"""Windowed chunk download over `Rpc`: the node's bundle fetch (DESIGN.md, Rollout).

The downloader asks for `length` bytes at `offset`; each answer carries the chunk
and the user properties `offset`, `total` (the file's size) and `sha256` (of the
chunk), or an empty payload with `error` and `message`. The server may send fewer
bytes than asked (the hub clamps to its `max_chunk_bytes`): the downloader advances
by what it received, asks for the rest, and asks for chunks of the size it learned
from then on. A chunk whose hash does not match is dropped and asked for again.

Chunks are appended to `{dest}.part` strictly in order (later ones wait in
memory), so the part file's size is always the last good offset: a download
interrupted by a disconnect or a restart resumes there. When the expected size is
known (from the manifest), the server's `total` must equal it.
"""

from __future__ import annotations

import hashlib
import os
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import paho.mqtt.client as paho

from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.mqtt import user_properties
from cellwatch.shared.rpc import Outcome, Policy, RemoteError, Rpc, RpcError, Sink, Ticket

POLL_S = 0.25
"""How often a waiting download checks whether it was cancelled."""


class TransferError(CellwatchError):
    """The download cannot finish: no progress, a refusal, or a server that
    contradicts itself or the manifest."""


class TransferCancelled(CellwatchError):
    """`cancelled()` said stop."""


@dataclass(frozen=True)
class Chunk:
    offset: int
    total: int
    data: bytes


def parse_chunk(msg: paho.MQTTMessage) -> Chunk:
    """A chunk answer; RemoteError for an error answer, ValueError if malformed
    (including a chunk whose SHA-256 does not match: it is asked for again)."""
    props = user_properties(msg)
    if "error" in props:
        raise RemoteError(props["error"], props.get("message", ""))
    data = bytes(msg.payload)
    try:
        offset, total = int(props["offset"]), int(props["total"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"chunk without a valid offset/total: {props}") from exc
    if offset < 0 or total < 0:
        raise ValueError(f"negative offset or total: {props}")
    if hashlib.sha256(data).hexdigest() != props.get("sha256"):
        raise ValueError(f"chunk at {offset} failed its SHA-256")
    return Chunk(offset, total, data)


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
    policy: Policy
    """Per chunk request: re-ask after retry_after_s; give up after timeout_s."""
    expected_size: int | None = None
    max_size: int | None = None
    cancelled: Callable[[], bool] = lambda: False
    progress: Callable[[int, int], None] = lambda done, total: None
    received: int = 0
    """Bytes that arrived (hash-checked), including any later discarded."""

    def run(self) -> int:
        """Download to dest (resuming dest.part); returns the file's size."""
        part = self.dest.with_name(self.dest.name + ".part")
        done = part.stat().st_size if part.exists() else 0
        if self.expected_size is not None and done > self.expected_size:
            part.unlink()  # longer than the file can be: start again
            done = 0
        total = self.expected_size
        chunk = self.chunk_bytes
        next_offset = done
        gaps: deque[tuple[int, int]] = deque()  # ranges asked for but only partly answered
        sink: Sink = queue.SimpleQueue()
        pending: dict[int, tuple[int, Ticket]] = {}  # offset -> (length, ticket)
        ready: dict[int, bytes] = {}
        try:
            with part.open("ab") as out:
                while total is None or done < total:
                    if self.cancelled():
                        raise TransferCancelled(f"download of {self.dest.name} cancelled")
                    while len(pending) < self.window:
                        if gaps:
                            offset, length = gaps.popleft()
                            if length > chunk:
                                gaps.appendleft((offset + chunk, length - chunk))
                                length = chunk
                        elif total is None and pending:
                            break  # learn the size from the first answer before fanning out
                        elif total is not None and next_offset >= total:
                            break
                        else:
                            offset = next_offset
                            length = chunk if total is None else min(chunk, total - offset)
                            next_offset += length
                        topic, payload = self.request_for(offset, length)
                        ticket = self.rpc.send(
                            topic, payload, parse_chunk, self.policy, sink=sink, tag=offset
                        )
                        pending[offset] = (length, ticket)
                    for offset, outcome in _drain(sink, POLL_S):
                        length, _ = pending.pop(offset)
                        got = self._chunk(outcome, offset, length, total)
                        if total is None:
                            total = got.total
                            self._check_size(total)
                            next_offset = min(next_offset, total)
                        n = len(got.data)
                        if n < length and offset + n < total:
                            chunk = min(chunk, max(n, 1))  # the server's limit
                            gaps.append((offset + n, length - n))
                        ready[offset] = got.data
                    while done in ready:
                        data = ready.pop(done)
                        out.write(data)
                        done += len(data)
                        self.progress(done, total or 0)
                        if not data:
                            break
                    if total is not None and total == done:
                        break
                out.flush()
                os.fsync(out.fileno())
        finally:
            for _, ticket in pending.values():
                ticket.cancel()
        os.replace(part, self.dest)
        return done

    def _chunk(self, outcome: Outcome, offset: int, length: int, total: int | None) -> Chunk:
        if isinstance(outcome, RemoteError):
            raise TransferError(f"{self.dest.name}: refused: {outcome}") from outcome
        if isinstance(outcome, RpcError):
            raise TransferError(f"{self.dest.name} at byte {offset}: {outcome}") from outcome
        got: Chunk = outcome.value
        self.received += len(got.data)
        name = self.dest.name
        if got.offset != offset:
            raise TransferError(f"{name}: asked for byte {offset}, got byte {got.offset}")
        if total is not None and got.total != total:
            raise TransferError(f"{name}: the server says {got.total} bytes, expected {total}")
        if len(got.data) > length:
            raise TransferError(f"{name}: asked for {length} bytes at {offset}, got more")
        if not got.data and offset < got.total:
            raise TransferError(f"{name}: empty chunk at {offset} of {got.total}")
        return got

    def _check_size(self, total: int) -> None:
        if self.max_size is not None and total > self.max_size:
            raise TransferError(f"{self.dest.name}: {total} bytes is over {self.max_size}")


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


def chunk_policy(retry_after_s: float, stall_timeout_s: float) -> Policy:
    """Re-ask for a chunk every retry_after_s; give up after stall_timeout_s."""
    attempts = max(1, int(stall_timeout_s // retry_after_s))
    return Policy(timeout_s=stall_timeout_s, retry_after_s=retry_after_s, max_attempts=attempts)
