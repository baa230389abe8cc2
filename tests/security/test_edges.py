"""Clear errors at the edges: `cellwatch-client`, the operator commands and the
services against a closed port say "connection refused" at once, and a wrong password
is one line, with no warning before it that pretends the client is reconnecting (the
MQTT client they share, shared/mqtt.py, tries a failed first connection no more)."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from cellwatch.shared.mqtt import ConnectRefused, MqttClient
from tests import images
from tests.broker import Broker, free_port
from tests.harness import wait_for
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


def test_operator_commands_and_services_say_connection_refused_at_once(stack: Stack) -> None:
    """The MQTT client the hub, the nodes and the operator commands share fails a first
    connection to a closed port at once (it does not try again until
    connect_timeout_s, then say the broker did not answer)."""
    env = {**os.environ, "CELLWATCH_MQTT__CONNECT_TIMEOUT_S": str(PATIENCE_S * 5)}
    env["CELLWATCH_HUB_CLIENT_CONFIG"] = str(stack.operator_config())
    port = str(free_port())
    for argv in (
        [str(BIN / "cellwatch-hub"), "nodes", "--port", port],
        [str(BIN / "cellwatch-hub"), "models", "--port", port],
    ):
        r = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=PATIENCE_S, check=False
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: connection refused by"), r.stderr
    node = stack.node("node-1")
    node.env.update({"CELLWATCH_MQTT__PORT": port, "CELLWATCH_MQTT__CONNECT_TIMEOUT_S": "300"})
    node.start()
    assert node.wait(PATIENCE_S) == 2, node.text()
    assert "connection refused by" in node.text() and "reconnecting" not in node.text()


def test_a_refused_first_connection_is_not_tried_again(
    lab_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password: the one exception, no log line that says otherwise (a
    "connection lost ... reconnecting" warning), and one login attempt."""
    settings = lab_broker.settings("client-labA").model_copy(
        update={"password": SecretStr("not-the-password"), "password_file": None}
    )
    client = MqttClient(settings, client_id="refused-once")
    with caplog.at_level(logging.DEBUG, logger="cellwatch"), pytest.raises(ConnectRefused):
        client.connect()
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    # The broker logs each refused login: a reconnect would add another.
    lab_broker.connect("client-labB").disconnect()  # a login after ours, as a marker
    wait_for(lambda: "client-labB" in lab_broker.log_text(), 30, "the marker login")
    assert lab_broker.log_text().count("not authorised") == 1, lab_broker.log_text()
