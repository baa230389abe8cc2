"""Rollouts through a real hub, as the operator sees them: the toy bundles' model refs,
a fleet of scripted nodes on v1, and waits on what the hub reports."""

from __future__ import annotations

from collections.abc import Callable

from cellwatch.hub.client import HubClient
from cellwatch.shared.hubapi import RolloutInfo
from cellwatch.shared.schemas import ModelRef
from cellwatch.shared.states import NodeState
from tests.harness import wait_for
from tests.hub.conftest import Bundles, NodeMaker
from tests.hub.scripted_nodes import FakeNode

NO_MODEL = ModelRef(name="none", version="none", manifest_sha256="0" * 64)


def ref(bundles: Bundles, version: str = "1.0.0") -> ModelRef:
    path = {"1.0.0": bundles.v1, "2.0.0": bundles.v2, "3.0.0": bundles.v3}[version]
    return ModelRef(name="toy", version=version, manifest_sha256=bundles.sha(path))


def until(
    operator: HubClient, rid: str, cond: Callable[[RolloutInfo], bool], timeout: float = 30
) -> RolloutInfo:
    """Poll the rollout until cond holds; its last status."""
    seen: list[RolloutInfo] = []

    def check() -> bool:
        seen.append(operator.rollout_status(rid))
        return cond(seen[-1])

    wait_for(check, timeout, f"rollout {rid}: {seen[-1] if seen else ''}")
    return seen[-1]


def states(info: RolloutInfo) -> dict[str, str]:
    """node id -> its target's state."""
    return {t.node_id: t.state for t in info.targets}


def fleet_on_v1(bundles: Bundles, fake_nodes: NodeMaker, **kwargs: object) -> list[FakeNode]:
    """Scripted node-1..node-3 running (and storing) toy 1.0.0."""
    nodes = []
    for i in (1, 2, 3):
        node = fake_nodes(f"node-{i}", model=ref(bundles), **kwargs)
        node.have.add(ref(bundles).manifest_sha256)
        nodes.append(node)
    return nodes


def seen_by_hub(operator: HubClient, count: int) -> None:
    wait_for(lambda: len(operator.nodes().nodes) == count, what=f"{count} nodes")


def hub_sees(operator: HubClient, ids: list[str], version: str = "1.0.0") -> None:
    """Until the hub shows every node of ids online on toy `version`."""

    def ok() -> bool:
        nodes = {n.node_id: n for n in operator.nodes().nodes}
        return all(
            i in nodes
            and nodes[i].state is NodeState.ONLINE
            and (nodes[i].model or NO_MODEL).version == version
            for i in ids
        )

    wait_for(ok, 30, f"hub sees {ids} online on {version}")
