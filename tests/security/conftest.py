"""Fixtures of the security suite: the broker with two lab accounts, and the stack of
hub and node processes around it (tests/security/stack.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.models import write_test_bundle
from tests.security.stack import LABS, NODES, Stack


@pytest.fixture
def lab_broker(tmp_path: Path) -> Iterator[Broker]:
    """The project's Mosquitto with users hub, operator, client, client-labA,
    client-labB, node-1 and node-2, made by the deploy/ scripts."""
    running = Broker.create(tmp_path / "broker", nodes=NODES, clients=LABS)
    try:
        yield running
    finally:
        running.close_clients()
        running.stop()


@pytest.fixture(scope="session")
def signed_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(v1 bundle, v2 bundle, trusted keys): toy 1.0.0 and 2.0.0 signed by key `test`."""
    root = tmp_path_factory.mktemp("security-bundles")
    keys = root / "keys"
    v1 = write_test_bundle(root / "v1", keys, version="1.0.0", seed=0)
    v2 = write_test_bundle(root / "v2", keys, version="2.0.0", seed=5)
    return v1, v2, keys


@pytest.fixture
def stack(
    lab_broker: Broker, signed_bundles: tuple[Path, Path, Path], tmp_path: Path
) -> Iterator[Stack]:
    v1, _, keys = signed_bundles
    s = Stack(tmp_path / "stack", lab_broker, v1, keys)
    s.work.mkdir()
    try:
        yield s
    finally:
        s.stop()
