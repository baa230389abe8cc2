"""Clear errors at the edges: `cellwatch-client` against a closed port says
"connection refused" at once, and a wrong password is one line, with no warning
before it that pretends the client is reconnecting."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests import images
from tests.broker import Broker, free_port
from tests.security.stack import BIN, Stack

PATIENCE_S = 60.0
"""Bounds the run (not a timing assertion): the client is told to wait five times as
long for a broker that does not answer, so only an immediate refusal ends in time."""


def classify(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    image = stack.work / "x.jpg"
    image.write_bytes(images.jpeg())
    cfg = stack.work / "labA.toml"
    cfg.write_text(stack.mqtt_section("client-labA"))
    env = {**os.environ, "CELLWATCH_MQTT__CONNECT_TIMEOUT_S": str(PATIENCE_S * 5)}
    return subprocess.run(
        [str(BIN / "cellwatch-client"), "classify", str(image), "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=PATIENCE_S,
        check=False,
    )


def test_a_closed_port_is_connection_refused_at_once(stack: Stack) -> None:
    r = classify(stack, "--port", str(free_port()))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: connection refused by"), r.stderr


def test_a_wrong_password_is_one_line(stack: Stack, lab_broker: Broker, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    r = classify(stack, "--password-file", str(wrong))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no "connection lost ... reconnecting" before it
    assert "refused the connection: Not authorized" in lines[0]
    assert "check the password" in lines[0]
