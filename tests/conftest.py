"""Fixtures every test package may use: `broker`, a real Mosquitto (tests/broker.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker


@pytest.fixture(autouse=True, scope="session")
def _private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A node started without `state_dir` keeps its journal of images in progress under
    $XDG_STATE_HOME/cellwatch/{node_id}. Point that at a directory of this run: a node
    killed in one test (or an earlier run) must not leave crash counts that turn the
    next test's images into poison images."""
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = saved


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
