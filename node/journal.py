"""The poison-image journal: which images this node started and never finished.

An image that crashes the node (a decoder bug, an OOM kill) is not acknowledged, so
the broker delivers it again after the restart, and it would crash the node again,
forever. The journal breaks the loop. It is an append-only text file:

    B                a node process opened the journal (a boot)
    S <image_id>     decoding started
    D <image_id>     answered (or given back unanswered at a clean stop)
    C <image_id> N   carried over by a compaction: N crashes so far

A boot whose images are still open (started, not done) when the next boot begins
(or at the end of the file) ended in a crash while they were in progress: each such
image id counts one crash, however many copies of it were in flight (a batch of
identical payloads shares one derived id). The node retries an image with one crash
once, alone (no other suspect in flight, so a second crash points at it), and answers
it with a `poison_image` error the next time. An answer clears the id.

Lines are flushed to the kernel at once (they survive kill -9 and the OOM killer,
not a power cut; a power cut is not what a poison image does). The file is
rewritten with only what is still needed when it grows past `COMPACT_BYTES`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

JOURNAL_FILE = "images.journal"
COMPACT_BYTES = 1024 * 1024
POISON_AFTER_CRASHES = 2
"""An image present for this many crashes is answered `poison_image` (one retry)."""


def read_crashes(text: str) -> dict[str, int]:
    """image id -> crashes it was in progress for, from a journal's text."""
    crashes: Counter[str] = Counter()
    open_ids: Counter[str] = Counter()

    def end_of_boot() -> None:
        for image_id, n in open_ids.items():
            if n > 0:
                crashes[image_id] += 1
        open_ids.clear()

    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "B":
            end_of_boot()
        elif kind == "S" and rest:
            open_ids[rest] += 1
        elif kind == "D" and rest:
            open_ids[rest] = max(0, open_ids[rest] - 1)
            crashes.pop(rest, None)
        elif kind == "C" and rest:
            image_id, _, count = rest.rpartition(" ")
            if image_id and count.isdigit():
                crashes[image_id] = max(crashes[image_id], int(count))
        # anything else: a torn last line
    end_of_boot()
    return {k: n for k, n in crashes.items() if n > 0}


class Journal:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / JOURNAL_FILE
        self._lock = threading.Lock()
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        self._crashes = read_crashes(text)
        self._open: Counter[str] = Counter()
        """Images started by this process and not finished (an id may repeat)."""
        self._file: TextIO = self._rewrite()
        if self._crashes:
            log.warning(
                "journal: %d image(s) were being processed when the node last stopped "
                "abnormally: %s",
                len(self._crashes),
                ", ".join(f"{i} ({n}x)" for i, n in sorted(self._crashes.items())[:10]),
            )

    def _rewrite(self) -> TextIO:
        """Replace the file by what is still needed (atomic): the crash counts, a boot
        marker for this process, and its images in progress."""
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(f"C {image_id} {n}\n" for image_id, n in self._crashes.items())
            f.write("B\n")
            for image_id, n in self._open.items():
                f.writelines(f"S {image_id}\n" for _ in range(n))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return self.path.open("a", encoding="utf-8")

    def crashes(self, image_id: str) -> int:
        """How many abnormal stops this image was in progress for."""
        with self._lock:
            return self._crashes.get(image_id, 0)

    def started(self, image_id: str) -> None:
        with self._lock:
            self._open[image_id] += 1
            self._write(f"S {image_id}\n")

    def finished(self, image_id: str) -> None:
        """The image was answered (or handed back at a clean stop): no longer a suspect."""
        with self._lock:
            if self._open[image_id] <= 1:
                del self._open[image_id]
            else:
                self._open[image_id] -= 1
            self._crashes.pop(image_id, None)
            self._write(f"D {image_id}\n")

    def _write(self, line: str) -> None:
        try:
            self._file.write(line)
            self._file.flush()
        except (OSError, ValueError) as exc:  # a full disk must not stop the node answering
            log.error("journal: cannot write %s: %s", self.path, exc)

    def compact(self) -> None:
        """Rewrite the file if it grew large (called from a background thread)."""
        with self._lock:
            try:
                if self.path.stat().st_size < COMPACT_BYTES:
                    return
                self._file.close()
                self._file = self._rewrite()
            except OSError as exc:
                log.error("journal: cannot compact %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            self._file.close()
