"""The hub at fleet scale: a 2,000-node wave, and a hub restart in the middle of it.

2,000 simulated nodes (tests/hub/swarm.py: a test-only broker user speaking for many
node ids over a few connections) against the real hub and the real broker. Before
the hub handed its broker acknowledgements over without blocking, a wave of more than
the control queue (1,000) froze its network, control and fetch threads for good.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.service import HubService
from cellwatch.shared.hubapi import RolloutInfo, RolloutStartArgs
from tests.broker import Broker
from tests.harness import wait_for
from tests.helpers.rollouts import ref
from tests.hub.conftest import Bundles, HubFactory
from tests.hub.swarm import Swarm, add_swarm_user

FLEET = 2000
ANSWER_DELAY_S = 0.02
"""Per answer and swarm connection (4 connections, 500 nodes each): the wave's answers
take about 10 s, so the hub restarts while most of them are still to come."""
POLL_S = 0.5
"""Polls here read 2,000 rows: slower than tests/harness.wait_for's default, to leave the
CPU to the hub."""


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
    wait_for(lambda: swarm.answered >= FLEET // 4, 300, "a quarter of the wave", every=POLL_S)
    assert swarm.answered < FLEET, "the wave finished before the hub stopped"
    hub.join()  # in the middle of the wave: reports queue up in the hub's session
    hub_factory()
    seen: list[RolloutInfo] = []

    def completed() -> bool:
        seen.append(operator.rollout_status(rid))
        return seen[-1].state == "completed"

    wait_for(completed, 600, f"rollout {rid} to complete", every=POLL_S)
    assert seen[-1].counts == {"active": FLEET}
    v2 = ref(bundles, "2.0.0")
    assert all(swarm.on(n) == v2 for n in swarm.node_ids)
    assert swarm.desired_count(rid) == FLEET
