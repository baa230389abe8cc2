"""Fixtures for the lab client's tests: in-process nodes with the toy model (from
tests/node), clients of the real broker, and `cellwatch-node` / `cellwatch-client`
as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellwatch.client import Client, ClientSettings
from tests.broker import Broker
from tests.helpers.nodes import write_config
from tests.node.conftest import node_factory, toy_bundle

__all__ = ["node_factory", "toy_bundle"]

BIN = Path(sys.executable).parent
ClientFactory = Callable[..., Client]


@pytest.fixture
def client_factory(broker: Broker) -> Iterator[ClientFactory]:
    """Connected Clients as user `client` (or `user`); closed at teardown."""
    made: list[Client] = []

    def make(user: str = "client", connect: bool = True, **overrides: Any) -> Client:
        client = Client(ClientSettings(mqtt=broker.settings(user), **overrides))
        if connect:
            client.connect()
            made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def client_toml(broker: Broker, path: Path, user: str = "client", **extra: object) -> Path:
    """A client config file like the one `make up` writes."""
    secret = path.with_suffix(".password")
    secret.write_text(broker.password(user))
    lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()]
    lines += [
        "[mqtt]",
        f'host = "{broker.host}"',
        f"port = {broker.port}",
        f'username = "{user}"',
        f'password_file = "{secret}"',
        "reconnect_min_s = 0.5",
        "reconnect_max_s = 2.0",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_client(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "cellwatch-client"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def node_toml(
    broker: Broker, toy: tuple[Path, Path], tmp: Path, node_id: str, **mqtt: object
) -> Path:
    """A `cellwatch-node run` config for node_id with the toy bundle."""
    return write_config(
        tmp,
        broker,
        *toy,
        "[limits]\ndecode_workers = 1",
        node_id,
        telemetry_interval_s=5.0,
        mqtt=mqtt,
    )
