"""`cellwatch-hub` operator commands as a user runs them, against a test broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.broker import Broker

HUB = str(Path(sys.executable).parent / "cellwatch-hub")


def cli(
    broker: Broker, *args: str, user: str = "operator", timeout: float = 5
) -> subprocess.CompletedProcess[str]:
    conn = [
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--user",
        user,
        "--password-file",
        str(broker.dir / "secrets" / f"{user}.password"),
        "--timeout",
        str(timeout),
    ]
    return subprocess.run(
        [HUB, *args, *conn], capture_output=True, text=True, timeout=120, check=False
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The command failed as a user mistake should: exit 2, one `error:` line, no traceback."""
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
