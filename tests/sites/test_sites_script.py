"""deploy/sites.py (`make up SITES=N`) as a user runs it: what it refuses before it
starts anything, and `link SITE down|up` on a real site link (deploy/sitelink.py).
The whole `up` (a model trained, a centre and two sites) is what README.md shows; the
topology itself is tested through tests/sites/test_sites.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import DEPLOY, Broker
from tests.harness import wait_for

if str(DEPLOY) not in sys.path:
    sys.path.insert(0, str(DEPLOY))

from demolib.processes import start_ticks

SITES = DEPLOY / "sites.py"


def sites(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SITES), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_up_refuses_a_busy_port_and_no_sites_before_starting_anything(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = sites("up", "--workdir", str(tmp_path / "w"), "--port", str(port))
    assert proc.returncode == 1
    assert f"port {port} is already in use" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "w" / "pids").exists()  # nothing was started
    proc = sites("up", "--workdir", str(tmp_path / "w"), "--sites", "0")
    assert (proc.returncode, "--sites must be at least 1" in proc.stdout) == (1, True)


def test_link_without_up_is_one_line(tmp_path: Path) -> None:
    proc = sites("link", "site-2", "down", "--workdir", str(tmp_path))
    assert proc.returncode == 1
    assert "no running link-site-2" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture
def recorded_link(broker: Broker, tmp_path: Path) -> Iterator[Path]:
    """A site link to the broker, recorded in tmp_path/pids as `up` records it; its
    state file."""
    state = tmp_path / "link.json"
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    argv = [sys.executable, str(DEPLOY / "sitelink.py"), "--listen", f"127.0.0.1:{port}"]
    argv += ["--to", f"{broker.host}:{broker.port}", "--state", str(state)]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        wait_for(lambda: state.exists(), 30, "the link's state file")
        (tmp_path / "pids").write_text(f"{proc.pid} {start_ticks(proc.pid)} link-site-2\n")
        yield state
    finally:
        proc.terminate()
        proc.wait(30)


def test_link_down_and_up_cut_and_restore_the_sites_link(
    recorded_link: Path, tmp_path: Path
) -> None:
    def up() -> bool:
        return bool(json.loads(recorded_link.read_text())["up"])

    assert up()
    proc = sites("link", "site-2", "down", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: not up(), 30, "the link cut")
    proc = sites("link", "site-2", "up", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(up, 30, "the link restored")
    proc = sites("down", "--workdir", str(tmp_path))
    assert proc.returncode == 0 and "stopped link-site-2" in proc.stdout
