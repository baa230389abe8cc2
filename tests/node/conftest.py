from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellwatch.node.faults import Faults
from cellwatch.node.service import NodeService
from tests.broker import Broker
from tests.harness import Requester
from tests.helpers.nodes import node_settings
from tests.models import write_test_bundle


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle dir, trusted keys dir) of the signed toy model."""
    root = tmp_path_factory.mktemp("toy")
    return write_test_bundle(root / "bundle", root / "keys"), root / "keys"


NodeFactory = Callable[..., NodeService]


@pytest.fixture
def node_factory(broker: Broker, toy_bundle: tuple[Path, Path]) -> Iterator[NodeFactory]:
    """Start in-process nodes; every one still running is stopped at teardown."""
    started: list[NodeService] = []

    def make(
        node_id: str = "node-1",
        *,
        start: bool = True,
        faults: Faults | None = None,
        **overrides: Any,
    ) -> NodeService:
        settings = node_settings(broker, toy_bundle, node_id, **overrides)
        service = NodeService(settings, faults=faults or Faults())
        if start:
            service.start()
            started.append(service)
        return service

    yield make
    for s in started:
        s.join()  # idempotent


@pytest.fixture
def requester(broker: Broker) -> Iterator[Requester]:
    r = Requester(broker.settings("client"))
    yield r
    r.close()
