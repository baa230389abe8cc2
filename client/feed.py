"""The feeder of `Core.many`: a thread that takes the caller's inputs while a window
slot is free, prepares and sends each, and hands every outcome to the caller's loop
through one queue, so an Answer is yielded as soon as it comes even while the input
iterable waits for its next image."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from cellwatch.client.answer import Answer
from cellwatch.client.errors import ClientError
from cellwatch.shared.rpc import Outcome, Sink, Ticket

if TYPE_CHECKING:
    from cellwatch.client.core import Core, Image, Prepared


@dataclass(frozen=True)
class End:
    """The feeder's last word: every input was sent and answered, or the iterable failed."""

    error: BaseException | None = None


class Feed:
    """The feeder thread of `Core.many`: takes inputs while a slot is free, prepares
    and sends each (outcomes go into `sink`), and puts `End` after the last answer."""

    def __init__(
        self,
        core: Core,
        images: Iterable[Image],
        limit: int,
        *,
        source: str | None,
        timeout: float | None,
        node: str | None,
    ) -> None:
        self.core = core
        self.images = images
        self.options = (source, timeout, node)
        self.sink: queue.SimpleQueue[tuple[object, object]] = queue.SimpleQueue()
        """(index, Outcome or ClientError) per input, then (End, None)."""
        self._slots = threading.Semaphore(limit)
        self._lock = threading.Lock()
        self._outstanding: dict[int, tuple[Prepared | str, Ticket | None]] = {}
        """index -> (the prepared image, or the input's name for an input error; its
        ticket once sent)."""
        self._fed: int | None = None
        """How many inputs there were, once the iterable is exhausted."""
        self._answered = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """The caller stopped (or finished): cancel what is still in flight."""
        self._closed.set()
        with self._lock:
            tickets = [t for _, t in self._outstanding.values() if t is not None]
            self._outstanding.clear()
        for ticket in tickets:
            ticket.cancel()

    def answer(self, index: int, outcome: Outcome | ClientError) -> Answer:
        with self._lock:
            entry, _ = self._outstanding.pop(index)
            self._answered += 1
            last = self._fed is not None and self._answered == self._fed
        self._slots.release()
        if last:
            self.sink.put((End(), None))
        if isinstance(entry, str):  # an input error: its outcome is the ClientError
            return Answer(entry, "", error=cast(ClientError, outcome))
        if isinstance(outcome, ClientError):  # refused when sent
            return Answer(entry.input, entry.image_id or "", error=outcome)
        return self.core.answer_of(entry, outcome)

    def _take_slot(self) -> bool:
        while not self._slots.acquire(timeout=0.1):
            if self._closed.is_set():
                return False
        return not self._closed.is_set()

    def _run(self) -> None:
        source, timeout, node = self.options
        index = -1
        try:
            for index, image in enumerate(self.images):
                if not self._take_slot():
                    return
                try:
                    p = self.core.prepare(image, index=index, source=source, node=node)
                except ClientError as exc:
                    name = f"bytes#{index}" if isinstance(image, bytes) else str(image)
                    with self._lock:
                        self._outstanding[index] = (name, None)
                    self.sink.put((index, exc))
                    continue
                with self._lock:  # before sending: its answer may come at once
                    self._outstanding[index] = (p, None)
                try:
                    ticket = self.core.send(p, cast(Sink, self.sink), index, timeout)
                except ClientError as exc:
                    self.sink.put((index, exc))
                    continue
                with self._lock:
                    if index in self._outstanding:
                        self._outstanding[index] = (p, ticket)
        except BaseException as exc:  # the iterable failed: the caller raises it
            self.sink.put((End(exc), None))
            return
        with self._lock:
            self._fed = index + 1
            done = self._answered == self._fed
        if done:
            self.sink.put((End(), None))
