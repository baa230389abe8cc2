"""The poison-image journal: which images this node started and never finished.

An image that crashes the node (a decoder bug, an OOM kill) is not acknowledged, so
the broker delivers it again after the restart, and it would crash the node again,
forever. The journal breaks the loop. It is an append-only text file of image keys
(`requests.journal_key`: the account that sent the image and the SHA-256 of its
content, `account:sha256`, never the image id its sender chose, so that another lab's
different image of the same name is never taken for a poison image):

    B                a node process opened the journal (a boot)
    S <key>          decoding started
    D <key>          answered (or given back unanswered at a clean stop)
    C <key> N        carried over by a compaction: N crashes so far

A boot whose images are still open (started, not done) when the next boot begins
(or at the end of the file) ended in a crash while they were in progress: each such
key counts one crash, however many copies of it were in flight (a batch of
identical payloads from one account shares one key). The node retries an image with
one crash once, alone (no other suspect in flight, so a second crash points at it),
and answers it with a `poison_image` error the next time. Any other answer clears the
key; a poison image's count stays (node/pipeline.py): every later copy of it, a lab
client's retry included, is answered `poison_image` at once, across restarts. Only
the same content from the same account: deleting this file in the state directory
(node stopped) gives every image another try, e.g. after a fix.

Threads. `crashes` and `started` run on a decode worker (which hashed the payload),
and `started` writes its line before the decode begins (a crash in the decoder must
find it). `finished` runs where a Result's
publish completes, often paho's network thread: it never waits, it only notes the
key and wakes the journal's own writer thread, which writes the `D` lines (as does
the next `started`); `crashes` reads without a lock. Compaction writes and syncs the
new file without holding the lock, so a slow disk stalls no image.

Lines are flushed to the kernel at once (they survive kill -9 and the OOM killer,
not a power cut; a power cut is not what a poison image does). The file is
rewritten with only what is still needed when it grows past `COMPACT_BYTES`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, deque
from pathlib import Path
from typing import TextIO

from cellwatch.node.faults import NO_FAULTS, FaultPoint, Faults

log = logging.getLogger(__name__)

JOURNAL_FILE = "images.journal"
COMPACT_BYTES = 1024 * 1024
POISON_AFTER_CRASHES = 2
"""An image present for this many crashes is answered `poison_image` (one retry)."""


def read_crashes(text: str) -> dict[str, int]:
    """key -> crashes it was in progress for, from a journal's text."""
    crashes: Counter[str] = Counter()
    open_keys: Counter[str] = Counter()

    def end_of_boot() -> None:
        for key, n in open_keys.items():
            if n > 0:
                crashes[key] += 1
        open_keys.clear()

    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "B":
            end_of_boot()
        elif kind == "S" and rest:
            open_keys[rest] += 1
        elif kind == "D" and rest:
            open_keys[rest] = max(0, open_keys[rest] - 1)
            crashes.pop(rest, None)
        elif kind == "C" and rest:
            key, _, count = rest.rpartition(" ")
            if key and count.isdigit():
                crashes[key] = max(crashes[key], int(count))
        # anything else: a torn last line
    end_of_boot()
    return {k: n for k, n in crashes.items() if n > 0}


class Journal:
    def __init__(self, state_dir: Path, faults: Faults = NO_FAULTS) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / JOURNAL_FILE
        self.faults = faults
        self.compact_bytes = COMPACT_BYTES
        self._lock = threading.Lock()
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        self._crashes = read_crashes(text)
        self._open: Counter[str] = Counter()
        """Images started by this process and not finished (a key may repeat)."""
        self._finished: deque[str] = deque()
        """Finished keys whose `D` line is not written yet (appended without a lock)."""
        self._tail: list[str] | None = None
        """While a compaction writes the new file: the lines written meanwhile."""
        self._wake = threading.Event()
        self._closed = False
        self._file: TextIO = self._open_new(self._snapshot())
        self._writer = threading.Thread(target=self._write_loop, name="journal", daemon=True)
        self._writer.start()
        if self._crashes:
            log.warning(
                "journal: %d image(s) were being processed when the node last stopped "
                "abnormally: %s",
                len(self._crashes),
                ", ".join(f"{i} ({n}x)" for i, n in sorted(self._crashes.items())[:10]),
            )

    # -- images --------------------------------------------------------------------------
    def crashes(self, key: str) -> int:
        """How many abnormal stops this image was in progress for. Any thread; no
        lock (a dict read is atomic)."""
        return self._crashes.get(key, 0)

    def started(self, key: str) -> None:
        """Decoding begins (decode worker): the line is with the kernel on return."""
        with self._lock:
            self._write_finished()
            self._open[key] += 1
            self._write(f"S {key}\n")

    def finished(self, key: str) -> None:
        """The image was answered (or handed back at a clean stop): no longer a
        suspect. Any thread; never waits (the writer thread writes its line)."""
        self._finished.append(key)
        self._wake.set()

    def flush(self) -> None:
        """Write the `D` lines of every image finished before this call."""
        with self._lock:
            self._write_finished()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                self.flush()
            except Exception:  # the writer must outlive anything (flush logs disk errors)
                log.exception("journal: writing finished images failed")

    # -- the file ------------------------------------------------------------------------
    def _write_finished(self) -> None:
        """Lock held."""
        lines = []
        while self._finished:
            key = self._finished.popleft()
            if self._open[key] <= 1:
                del self._open[key]
            else:
                self._open[key] -= 1
            self._crashes.pop(key, None)
            lines.append(f"D {key}\n")
        if lines:
            self._write("".join(lines))

    def _write(self, text: str) -> None:
        """Lock held."""
        if self._tail is not None:
            self._tail.append(text)
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError) as exc:  # a full disk must not stop the node answering
            log.error("journal: cannot write %s: %s", self.path, exc)

    def _snapshot(self) -> str:
        """Lock held (or not shared yet): what a rewritten file holds: the crash
        counts, a boot marker for this process, and its images in progress."""
        lines = [f"C {key} {n}\n" for key, n in self._crashes.items()]
        lines.append("B\n")
        for key, n in self._open.items():
            lines.extend(f"S {key}\n" for _ in range(n))
        return "".join(lines)

    def _open_new(self, text: str, tail: list[str] | None = None) -> TextIO:
        """Write text to a new file, sync it (no lock held: this is the slow part),
        and return it open for appending; `tail` (lines written meanwhile) is added
        and the file put in place by the caller."""
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            self.faults.at(FaultPoint.JOURNAL_SYNC)
            os.fsync(f.fileno())
        if tail is None:
            os.replace(tmp, self.path)
            return self.path.open("a", encoding="utf-8")
        return tmp.open("a", encoding="utf-8")

    def compact(self) -> None:
        """Rewrite the file if it grew past `compact_bytes` (the periodic thread). The
        lock is held only to take a snapshot and, after the new file is synced, to add
        what was written meanwhile and swap the files."""
        with self._lock:
            try:
                if self._tail is not None or self.path.stat().st_size < self.compact_bytes:
                    return
            except OSError as exc:
                log.error("journal: cannot compact %s: %s", self.path, exc)
                return
            self._write_finished()
            snapshot = self._snapshot()
            tail: list[str] = []
            self._tail = tail
        try:
            new = self._open_new(snapshot, tail)
        except OSError as exc:
            log.error("journal: cannot compact %s: %s", self.path, exc)
            with self._lock:
                self._tail = None
            return
        with self._lock:
            self._tail = None
            try:
                new.write("".join(tail))
                new.flush()
                os.replace(self.path.with_suffix(".tmp"), self.path)
            except OSError as exc:
                log.error("journal: cannot compact %s: %s", self.path, exc)
                new.close()
                return
            old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        """Write what is pending and close (idempotent)."""
        self._closed = True
        self._wake.set()
        if self._writer is not threading.current_thread():
            self._writer.join(timeout=10)
        with self._lock:
            if not self._file.closed:
                self._write_finished()
                self._file.close()
