"""Fixtures for the hub tests: signed toy bundles, in-process hubs, the operator's
client, and scripted nodes (real MQTT peers speaking the node's side of the protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.config import HubSettings
from cellwatch.hub.service import HubService
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.signing import TrustedKeys
from tests.broker import Broker
from tests.harness import Requester
from tests.hub.scripted_nodes import FakeNode
from tests.models import write_test_bundle
from tests.security.stack import Stack


@dataclass(frozen=True)
class Bundles:
    keys: Path
    """Trusted keys directory (key `test`)."""
    v1: Path
    v2: Path
    v3: Path
    untrusted: Path
    """Signed by a key that is not in `keys`."""

    def sha(self, bundle: Path) -> str:
        return load_bundle(bundle, TrustedKeys.load(self.keys)).manifest_sha256


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("hub-bundles")
    keys = root / "keys"
    v1 = write_test_bundle(root / "v1", keys, version="1.0.0", seed=0)
    v2 = write_test_bundle(root / "v2", keys, version="2.0.0", seed=5)
    v3 = write_test_bundle(root / "v3", keys, version="3.0.0", seed=9)
    untrusted = write_test_bundle(
        root / "untrusted", root / "other-keys", version="6.6.6", seed=3, key_name="mallory"
    )
    return Bundles(keys, v1, v2, v3, untrusted)


HubFactory = Callable[..., HubService]


def hub_settings(broker: Broker, data_dir: Path, keys: Path, **overrides: Any) -> HubSettings:
    values: dict[str, Any] = {
        "mqtt": broker.settings("hub"),
        "data_dir": data_dir,
        "trusted_keys": keys,
        "tick_s": 0.1,
        "http": {"listen": "127.0.0.1:0"},  # any free port: tests run side by side
    }
    values.update(overrides)
    return HubSettings(**values)


@pytest.fixture
def hub_factory(broker: Broker, bundles: Bundles, tmp_path: Path) -> Iterator[HubFactory]:
    """Start in-process hubs on tmp_path/hub (same data dir: a restart resumes)."""
    running: list[HubService] = []

    def make(**overrides: Any) -> HubService:
        hub = HubService(hub_settings(broker, tmp_path / "hub", bundles.keys, **overrides))
        hub.start()
        running.append(hub)
        return hub

    yield make
    for hub in running:
        if not hub.wait(0):
            hub.join()


@pytest.fixture
def hub(hub_factory: HubFactory) -> HubService:
    return hub_factory()


@pytest.fixture
def operator(broker: Broker) -> Iterator[HubClient]:
    client = HubClient(broker.settings("operator"), timeout_s=10.0)
    client.connect()
    yield client
    client.close()


NodeMaker = Callable[..., FakeNode]


@pytest.fixture
def fake_nodes(broker: Broker) -> Iterator[NodeMaker]:
    made: list[FakeNode] = []

    def make(node_id: str, **kwargs: Any) -> FakeNode:
        node = FakeNode(broker.settings(node_id), node_id, **kwargs)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


@pytest.fixture
def stack(broker: Broker, bundles: Bundles, tmp_path: Path) -> Iterator[Stack]:
    """Hub and node processes with configuration files (tests/security/stack.py)."""
    s = Stack(tmp_path / "stack", broker, bundles.v1, bundles.keys)
    s.work.mkdir()
    yield s
    s.stop()


@pytest.fixture
def requester(broker: Broker) -> Iterator[Requester]:
    r = Requester(broker.settings("client"))
    yield r
    r.close()
