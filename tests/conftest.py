"""Fixtures every test package may use: `broker`, a real Mosquitto (tests/broker.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto running the project's mosquitto.conf on two free ports (plain and
    TLS), with users hub, operator, client, node-1..node-3 and their ACL; stopped (and
    its clients disconnected) at teardown."""
    running = Broker.create(tmp_path / "broker")
    try:
        yield running
    finally:
        running.close_clients()
        running.stop()
