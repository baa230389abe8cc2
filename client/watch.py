"""`cellwatch-client watch DIR`: send each new image in a folder once it is
completely written, and append every Answer to a JSON-lines file.

- A file is ready when its size and mtime have not changed for `settle_s` (a file
  still being written keeps changing; it is sent once it stops).
- The state file (JSON lines, compacted at start and as it grows) records each file
  sent and each file done, with the size and mtime it had: a restart skips what is
  done and sends again what was sent but not answered. Files no longer in the
  folder are dropped from it, so it does not grow for ever. A file replaced by a
  different one (other size or mtime) is sent again.
- A timed-out image (no node, no broker) stays pending and is sent again; an image
  the client cannot send (too large, unreadable) gets an error line and is done.
- Answers are written (and fsynced) before their files are marked done, so a crash
  in between can repeat a line, never lose one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cellwatch.client.answer import Answer
from cellwatch.client.core import Core, Prepared
from cellwatch.client.errors import BrokerUnavailable, ClientError, NotAuthorized, Timeout
from cellwatch.client.inputs import is_image_name
from cellwatch.client.summary import Summary
from cellwatch.shared.rpc import Sink

log = logging.getLogger(__name__)

Key = tuple[int, int]
"""(size, mtime_ns) of a file as it was sent."""


COMPACT_AFTER_LINES = 10_000
"""The state file is rewritten (one line per file) once this many lines, or as many
as it holds files, were appended since it was last written whole."""


class StateFile:
    """Which files were sent and which are done (JSON lines; the last line per file
    wins). Rewritten compactly when opened and whenever it has grown by
    COMPACT_AFTER_LINES lines; each rewrite forgets the done files no longer in
    `folder`, so a folder whose images are moved away after use keeps a small state
    file (at start, also the sent ones: nothing is in flight then)."""

    def __init__(self, path: Path, folder: Path | None = None) -> None:
        self.path = path
        self.folder = folder
        self.done: dict[str, Key] = {}
        self.sent: dict[str, Key] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    name, key = entry["file"], (int(entry["size"]), int(entry["mtime_ns"]))
                    state = entry["state"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: ignoring a malformed line", path, number)
                    continue
                if state == "done":
                    self.done[name] = key
                    self.sent.pop(name, None)
                elif state == "sent":
                    self.sent[name] = key
        self._file: IO[str] | None = None
        self._appended = 0
        self._compact(prune_sent=True)
        self.pending_at_start = dict(self.sent)

    @staticmethod
    def _line(name: str, key: Key, state: str) -> str:
        return json.dumps({"file": name, "size": key[0], "mtime_ns": key[1], "state": state}) + "\n"

    def _present(self) -> set[str] | None:
        if self.folder is None:
            return None
        try:
            with os.scandir(self.folder) as entries:
                return {e.name for e in entries}
        except OSError:
            return None  # a folder that cannot be read: forget nothing

    def _compact(self, *, prune_sent: bool = False) -> None:
        """Write the state whole (aside, then renamed), without the files gone."""
        present = self._present()
        if present is not None:
            self.done = {n: k for n, k in self.done.items() if n in present}
            if prune_sent:
                self.sent = {n: k for n, k in self.sent.items() if n in present}
        if self._file is not None:
            self._file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            for name, key in self.done.items():
                f.write(self._line(name, key, "done"))
            for name, key in self.sent.items():
                f.write(self._line(name, key, "sent"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        self._appended = 0

    def mark(self, entries: list[tuple[str, Key, str]]) -> None:
        assert self._file is not None
        for name, key, state in entries:
            self._file.write(self._line(name, key, state))
            if state == "done":
                self.done[name] = key
                self.sent.pop(name, None)
            else:
                self.sent[name] = key
        self._file.flush()
        os.fsync(self._file.fileno())
        self._appended += len(entries)
        if self._appended >= max(COMPACT_AFTER_LINES, len(self.done) + len(self.sent)):
            self._compact()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class _Seen:
    key: Key
    since: float


@dataclass
class Watcher:
    core: Core
    folder: Path
    out: Path
    state_path: Path
    interval_s: float = 0.5
    settle_s: float = 1.0
    concurrency: int = 16
    source: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    on_answer: Callable[[Answer], None] = lambda answer: None
    summary: Summary = field(default_factory=Summary)

    def __post_init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._todo: deque[tuple[str, Key]] = deque()
        self._queued: set[str] = set()
        self._completed: Sink = queue.SimpleQueue()
        self._sent: dict[str, tuple[Key, Prepared]] = {}
        """Files in flight."""

    @property
    def in_flight(self) -> int:
        return len(self._sent)

    def run(self) -> Summary:
        """Watch until `stop` is set; NotAuthorized stops it at once."""
        state = StateFile(self.state_path, self.folder)
        if state.pending_at_start:
            log.warning(
                "%d images sent before the last stop got no answer: sending them again",
                len(state.pending_at_start),
            )
        try:
            with self.out.open("a") as out:
                while not self.stop.is_set():
                    self._scan(state)
                    self._submit(state, out)
                    self._collect(state, out)
        finally:
            state.close()
        return self.summary

    # -- finding ready files ------------------------------------------------------------
    def _scan(self, state: StateFile) -> None:
        now = time.monotonic()
        present: set[str] = set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.is_file() or not is_image_name(Path(entry.name)):
                    continue
                name = entry.name
                present.add(name)
                if name in self._sent or name in self._queued:
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                key = (st.st_size, st.st_mtime_ns)
                if state.done.get(name) == key:
                    continue
                seen = self._seen.get(name)
                if seen is None or seen.key != key:
                    self._seen[name] = _Seen(key, now)  # new or still changing
                elif now - seen.since >= self.settle_s:
                    del self._seen[name]
                    self._todo.append((name, key))
                    self._queued.add(name)
        for gone in set(self._seen) - present:
            del self._seen[gone]

    def _submit(self, state: StateFile, out: IO[str]) -> None:
        sent: list[tuple[str, Key, str]] = []
        while self._todo and len(self._sent) < self.concurrency and not self.stop.is_set():
            name, key = self._todo.popleft()
            self._queued.discard(name)
            path = self.folder / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if (st.st_size, st.st_mtime_ns) != key:
                continue  # changed again since it settled: the next scans see it anew
            try:
                p = self.core.prepare(path, source=self.source)
                self.core.send(p, self._completed, name)
            except NotAuthorized:
                raise
            except ClientError as exc:
                self._write(out, [answer := Answer(str(path), "", error=exc)])
                state.mark([(name, key, "done")])
                self.summary.add(answer)
                continue
            self._sent[name] = (key, p)
            sent.append((name, key, "sent"))
        if sent:
            state.mark(sent)

    def _collect(self, state: StateFile, out: IO[str]) -> None:
        try:
            first = self._completed.get(timeout=self.interval_s)
        except queue.Empty:
            return
        batch = [first]
        while True:
            try:
                batch.append(self._completed.get_nowait())
            except queue.Empty:
                break
        done: list[tuple[str, Key, str]] = []
        answers: list[Answer] = []
        for tag, outcome in batch:
            name = str(tag)
            key, p = self._sent.pop(name)
            answer = self.core.answer_of(p, outcome)
            if isinstance(answer.error, NotAuthorized):
                raise answer.error
            if isinstance(answer.error, (Timeout, BrokerUnavailable)):
                log.warning("%s: %s; sending it again", name, answer.error)
                self._todo.append((name, key))
                self._queued.add(name)
                continue
            answers.append(answer)
            done.append((name, key, "done"))
        if answers:
            self._write(out, answers)
            state.mark(done)
            for answer in answers:
                self.summary.add(answer)

    def _write(self, out: IO[str], answers: list[Answer]) -> None:
        """Answers first, durably; the caller marks their files done after."""
        for answer in answers:
            out.write(answer.to_json() + "\n")
            self.on_answer(answer)
        out.flush()
        os.fsync(out.fileno())
