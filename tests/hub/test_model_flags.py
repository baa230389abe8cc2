"""Models flagged synthetic, untrained or degraded: the hub lists the flags, and a
rollout of an untrained or synthetic model needs an explicit confirmation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.service import HubService
from cellwatch.shared.hubapi import RolloutStartArgs
from tests.broker import Broker
from tests.helpers.hubcli import cli, one_line_error
from tests.helpers.rollouts import seen_by_hub
from tests.hub.conftest import Bundles, NodeMaker
from tests.models import write_test_bundle

UNTRAINED: dict[str, object] = {"synthetic": True, "base_checkpoint": None}
DEGRADED: dict[str, object] = {
    "synthetic": False,
    "base_checkpoint": "/ckpt/inception_v3.ckpt",
    "gate": {"passed": False, "overridden": True},
}


@pytest.fixture
def flagged(tmp_path: Path, bundles: Bundles) -> dict[str, Path]:
    return {
        "untrained": write_test_bundle(
            tmp_path / "u", bundles.keys, version="7.0.0", provenance=UNTRAINED
        ),
        "degraded": write_test_bundle(
            tmp_path / "d", bundles.keys, version="8.0.0", seed=2, provenance=DEGRADED
        ),
    }


def test_flags_are_listed_and_untrained_rollouts_need_confirmation(
    hub: HubService,
    operator: HubClient,
    bundles: Bundles,
    flagged: dict[str, Path],
    fake_nodes: NodeMaker,
) -> None:
    fake_nodes("node-1")
    seen_by_hub(operator, 1)
    operator.push(bundles.v1)
    for path in flagged.values():
        operator.push(path)
    listed = {m.version: (m.synthetic, m.untrained, m.degraded) for m in operator.models().models}
    assert listed == {
        "1.0.0": (False, False, False),
        "7.0.0": (True, True, False),
        "8.0.0": (False, False, True),
    }

    with pytest.raises(ApiFailure) as refused:
        operator.rollout_start(RolloutStartArgs(name="toy", version="7.0.0"))
    assert refused.value.code == "untrained_model"
    assert "SYNTHETIC and UNTRAINED" in refused.value.message
    assert "--yes-untrained" in refused.value.message
    assert operator.rollout_list().rollouts == []  # nothing started

    info = operator.rollout_start(RolloutStartArgs(name="toy", version="7.0.0", yes_untrained=True))
    assert info.model_flags == ["synthetic", "untrained"]
    assert operator.rollout_status(info.rollout_id).model_flags == ["synthetic", "untrained"]
    operator.rollout_verb("abort", info.rollout_id)

    # degraded needs the confirmation too (issue 18, point 7)
    with pytest.raises(ApiFailure) as refused_degraded:
        operator.rollout_start(RolloutStartArgs(name="toy", version="8.0.0"))
    assert refused_degraded.value.code == "untrained_model"
    assert "DEGRADED" in refused_degraded.value.message
    degraded = operator.rollout_start(
        RolloutStartArgs(name="toy", version="8.0.0", yes_untrained=True)
    )
    assert degraded.model_flags == ["degraded"]


def test_cli_shows_flags_and_asks_for_yes_untrained(
    hub: HubService,
    broker: Broker,
    operator: HubClient,
    flagged: dict[str, Path],
    fake_nodes: NodeMaker,
) -> None:
    fake_nodes("node-1")
    seen_by_hub(operator, 1)
    assert cli(broker, "push", str(flagged["untrained"])).returncode == 0
    assert cli(broker, "push", str(flagged["degraded"])).returncode == 0
    table = cli(broker, "models")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[1]: line for line in table.stdout.splitlines() if line.startswith("toy")}
    assert "SYNTHETIC,UNTRAINED" in rows["7.0.0"] and "DEGRADED" in rows["8.0.0"]
    as_json = json.loads(cli(broker, "models", "--json").stdout)["models"]
    assert {m["version"]: m["untrained"] for m in as_json} == {"7.0.0": True, "8.0.0": False}

    one_line_error(cli(broker, "rollout", "start", "toy", "7.0.0"), "UNTRAINED", "--yes-untrained")
    started = cli(broker, "rollout", "start", "toy", "7.0.0", "--yes-untrained")
    assert started.returncode == 0, started.stderr
    assert "model is SYNTHETIC, UNTRAINED: not for real decisions" in started.stdout
