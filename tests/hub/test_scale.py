"""The hub at fleet scale: a 2,000-node wave, and a hub restart in the middle of it.

2,000 simulated nodes (tests/hub/swarm.py: a test-only broker user speaking for many
node ids over a few connections) against the real hub and the real broker. Before
the hub handed its broker acknowledgements over without blocking, a wave of more than
the control queue (1,000) froze its network, control and fetch threads for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.service import HubService
from cellwatch.shared.hubapi import RolloutInfo, RolloutStartArgs
from cellwatch.shared.schemas import ModelRef
from tests.broker import Broker
from tests.hub.conftest import Bundles, HubFactory
from tests.hub.swarm import Swarm, add_swarm_user

FLEET = 2000
ANSWER_DELAY_S = 0.02
"""Per answer and swarm connection (4 connections, 500 nodes each): the wave's answers
take about 10 s, so the hub restarts while most of them are still to come."""
POLL_S = 0.5
"""Polls here read 2,000 rows: slower than tests/harness.wait_for, to leave the CPU to
the hub."""


def poll(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def ref(bundles: Bundles, version: str) -> ModelRef:
    path = {"1.0.0": bundles.v1, "2.0.0": bundles.v2}[version]
    return ModelRef(name="toy", version=version, manifest_sha256=bundles.sha(path))


@pytest.fixture
def swarm(broker: Broker, bundles: Bundles) -> Iterator[Swarm]:
    add_swarm_user(broker)
    s = Swarm(
        broker,
        [f"sim-{i:04d}" for i in range(FLEET)],
        model=ref(bundles, "1.0.0"),
        answer_delay_s=ANSWER_DELAY_S,
    )
    yield s
    s.close()


def known_nodes(hub: HubService) -> int:
    return hub.db.node_count()


def test_a_2000_node_wave_survives_a_hub_restart_in_the_middle(
    hub_factory: HubFactory, operator: HubClient, bundles: Bundles, swarm: Swarm
) -> None:
    hub = hub_factory()
    swarm.connect(known=lambda: known_nodes(hub))
    assert known_nodes(hub) == FLEET
    operator.push(bundles.v2)
    info = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0", waves="100%"))
    rid = info.rollout_id
    assert len(info.targets) == FLEET
    poll(lambda: swarm.answered >= FLEET // 4, 300, "a quarter of the wave")
    assert swarm.answered < FLEET, "the wave finished before the hub stopped"
    hub.join()  # in the middle of the wave: reports queue up in the hub's session
    hub_factory()
    seen: list[RolloutInfo] = []

    def completed() -> bool:
        seen.append(operator.rollout_status(rid))
        return seen[-1].state == "completed"

    poll(completed, 600, f"rollout {rid} to complete")
    assert seen[-1].counts == {"active": FLEET}
    v2 = ref(bundles, "2.0.0")
    assert all(swarm.on(n) == v2 for n in swarm.node_ids)
    assert swarm.desired_count(rid) == FLEET
