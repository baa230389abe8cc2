"""The poison-image journal's bookkeeping (node/journal.py), on its own files: the
process tests (test_crashes.py) show the same with real crashes."""

from __future__ import annotations

import threading
from pathlib import Path

from cellwatch.node.journal import COMPACT_BYTES, Journal, read_crashes


def test_an_image_open_at_a_crash_counts_one_crash_per_boot(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    for _ in range(5):  # five copies of one payload in flight: one derived image id
        first.started("same-id")
    first.started("done-id")
    first.finished("done-id")
    first.flush()  # (its writer thread writes the line at once)
    # the process dies here: nothing more is written
    second = Journal(tmp_path)
    assert second.crashes("same-id") == 1  # one crash, not five
    assert second.crashes("done-id") == 0
    second.started("same-id")  # the retry, alone; it crashes the node again
    third = Journal(tmp_path)
    assert third.crashes("same-id") == 2
    third.finished("same-id")  # answered (poison_image): no longer a suspect
    third.flush()  # (its writer thread writes the line at once)
    assert third.crashes("same-id") == 0
    third.close()
    assert Journal(tmp_path).crashes("same-id") == 0


def test_a_clean_stop_leaves_no_suspect(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.started("a")
    j.finished("a")  # handed back at the stop
    j.close()
    assert Journal(tmp_path).crashes("a") == 0


def test_compaction_keeps_the_counts_and_what_is_in_progress(tmp_path: Path) -> None:
    Journal(tmp_path).started("crashed")  # dies with it open
    j = Journal(tmp_path)
    j.started("running")
    for i in range(COMPACT_BYTES // 10):
        j.started(f"img-{i}")
        j.finished(f"img-{i}")
    j.compact()
    assert j.path.stat().st_size < 1000
    assert read_crashes(j.path.read_text()) == {"crashed": 1, "running": 1}


def test_finishing_an_image_never_waits_for_the_journal(tmp_path: Path) -> None:
    """`finished` runs on paho's network thread: while a write or a compaction holds
    the journal, it returns at once; the line is written when the journal is free."""
    j = Journal(tmp_path)
    j.started("a")
    returned = threading.Event()

    def finish() -> None:
        j.finished("a")
        returned.set()

    with j._lock:  # what a slow write holds
        threading.Thread(target=finish, daemon=True).start()
        assert returned.wait(10), "finished() waited for the journal's lock"
    j.flush()
    j.close()
    assert "D a" in j.path.read_text()


def test_a_torn_last_line_is_ignored() -> None:
    assert read_crashes("B\nS a\nS b") == {"a": 1, "b": 1}
    assert read_crashes("B\nS a\nD") == {"a": 1}
    assert read_crashes("C x 2\nB\n") == {"x": 2}
