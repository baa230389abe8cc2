"""`cellwatch-client watch DIR` as a real process: files arriving, a file still being
written, Ctrl-C and a restart that resumes, a folder of 10,000 files, and a state
file that forgets the files moved away."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cellwatch.client import watch as watch_module
from cellwatch.client.watch import StateFile
from tests import images
from tests.broker import Broker
from tests.client.conftest import BIN, client_toml
from tests.harness import wait_for
from tests.node.conftest import NodeFactory

SMALL = images.jpeg(images.RED, 48, 64)


class Watch:
    """`cellwatch-client watch` running; `answers()` reads its --out file."""

    def __init__(self, folder: Path, out: Path, cfg: Path, *args: str) -> None:
        self.out = out
        self.log = out.with_name(out.name + f".{time.monotonic_ns()}.log")
        argv = ["watch", str(folder), "--out", str(out), "--config", str(cfg), "--interval", "0.1"]
        self.proc = subprocess.Popen(
            [str(BIN / "cellwatch-client"), *argv, *args],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )

    def answers(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        text = self.out.read_text()
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def names(self) -> Counter[str]:
        return Counter(Path(a["input"]).name for a in self.answers())

    def stop(self) -> str:
        """Ctrl-C; returns its stderr."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 0, self.log.read_text()
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def test_files_arriving_a_partial_write_ctrl_c_and_a_restart(
    broker: Broker, node_factory: NodeFactory, tmp_path: Path
) -> None:
    node_factory()
    cfg = client_toml(broker, tmp_path / "client.toml")
    folder = tmp_path / "incoming"
    folder.mkdir()
    out = tmp_path / "results.jsonl"
    watch = Watch(folder, out, cfg, "--settle", "2.0")
    try:
        for i in range(5):
            (folder / f"a-{i}.jpg").write_bytes(SMALL)
        (folder / "notes.txt").write_bytes(images.TEXT)  # not an image name: ignored
        wait_for(lambda: len(watch.answers()) >= 5, 60, "5 answers")

        # A file written slowly, in pieces: a truncated JPEG would be undecodable_image,
        # so an ok Result means it was sent once, complete.
        big = images.jpeg(images.RED, 480, 640)
        pieces = [big[i : i + len(big) // 20] for i in range(0, len(big), len(big) // 20)]

        def slow_writer() -> None:
            with (folder / "slow.jpg").open("wb") as f:
                for piece in pieces:
                    f.write(piece)
                    f.flush()
                    time.sleep(0.1)  # the "microscope" writing; shorter than --settle

        writer = threading.Thread(target=slow_writer)
        writer.start()
        (folder / "b-0.jpg").write_bytes(SMALL)
        wait_for(lambda: "b-0.jpg" in watch.names(), 60, "b-0 while slow.jpg is written")
        writer.join()
        wait_for(lambda: "slow.jpg" in watch.names(), 60, "slow.jpg")
        slow = [a for a in watch.answers() if a["input"].endswith("slow.jpg")]
        assert len(slow) == 1 and slow[0]["status"] == "ok", slow

        # Ctrl-C with work in flight, then a restart: nothing twice, nothing forgotten.
        for i in range(20):
            (folder / f"c-{i:02d}.jpg").write_bytes(SMALL)
        wait_for(lambda: any(n.startswith("c-") for n in watch.names()), 60, "first c- answer")
        stderr = watch.stop()
        assert "Traceback" not in stderr
        before = watch.names()
        watch = Watch(folder, out, cfg, "--settle", "0.2")
        wait_for(lambda: len(watch.names()) == 27, 120, "all 27 images answered")
        stderr = watch.stop()
    finally:
        watch.kill()
    names = watch.names()
    assert set(names.values()) == {1}, names  # each file once, across the restart
    assert set(names) == {f"a-{i}.jpg" for i in range(5)} | {"slow.jpg", "b-0.jpg"} | {
        f"c-{i:02d}.jpg" for i in range(20)
    }
    assert all(a["status"] == "ok" for a in watch.answers())
    resent = 27 - len(before)
    assert f"publishes: {resent} (" in stderr, stderr  # only what was not answered yet


@pytest.mark.slow
def test_ten_thousand_files_and_a_restart_sends_none_again(
    broker: Broker, node_factory: NodeFactory, tmp_path: Path
) -> None:
    node_factory(limits={"decode_workers": 2})
    cfg = client_toml(broker, tmp_path / "client.toml", concurrency=64)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(10_000):
        (folder / f"img-{i:05d}.jpg").write_bytes(SMALL)
    out = tmp_path / "results.jsonl"
    watch = Watch(folder, out, cfg, "--settle", "0.2")
    try:
        wait_for(lambda: len(watch.answers()) >= 10_000, 600, "10,000 answers")
        watch.stop()
        (folder / "new.jpg").write_bytes(SMALL)
        watch = Watch(folder, out, cfg, "--settle", "0.2")
        wait_for(lambda: "new.jpg" in watch.names(), 120, "new.jpg")
        stderr = watch.stop()
    finally:
        watch.kill()
    names = watch.names()
    assert len(names) == 10_001 and set(names.values()) == {1}
    assert "publishes: 1 (" in stderr, stderr  # the restart sent only the new file


def test_the_state_file_forgets_files_no_longer_in_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A microscope PC that moves answered images away keeps a small state file: at
    start and as it grows, the files gone from the folder are dropped from it."""
    monkeypatch.setattr(watch_module, "COMPACT_AFTER_LINES", 4)
    folder = tmp_path / "incoming"
    folder.mkdir()
    path = tmp_path / "results.jsonl.state"
    state = StateFile(path, folder)
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(SMALL)
        state.mark([(f"{i}.jpg", (1, i), "sent")])
        state.mark([(f"{i}.jpg", (1, i), "done")])
        if i >= 1:
            (folder / f"{i - 1}.jpg").unlink()  # moved away once answered
    state.close()
    assert len(path.read_text().splitlines()) <= 4  # compacted as it grew
    (folder / "5.jpg").unlink()
    (folder / "kept.jpg").write_bytes(SMALL)
    state = StateFile(path, folder)
    state.mark([("kept.jpg", (1, 9), "done")])
    state.close()
    again = StateFile(path, folder)
    assert again.done == {"kept.jpg": (1, 9)} and again.sent == {}
    again.close()
    assert len(path.read_text().splitlines()) == 1
