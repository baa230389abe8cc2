"""The shadow phase of a rollout (issue 19): without I/O, the rule on the Wilson interval,
--shadow-for, the operator's verbs, failed targets, and the windows stored once; with
a hub and scripted nodes of before the phase, that they go on as ever."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.db import Database, window_facts
from cellwatch.hub.errors import ApiFailure, RolloutError
from cellwatch.hub.rollout import Rollout
from cellwatch.hub.rolloutinfo import describe
from cellwatch.hub.service import HubService
from cellwatch.hub.targets import NodeView
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.figures import wilson
from cellwatch.shared.hubapi import RolloutPolicy, RolloutStartArgs, ShadowPolicy
from cellwatch.shared.promotion import (
    ShadowSpecError,
    parse_duration,
    parse_promote_when,
    parse_rate,
)
from cellwatch.shared.schemas import Disagreement, ModelRef, ShadowWindow
from cellwatch.shared.states import RolloutState, ShadowState
from cellwatch.shared.topics import Topics
from tests.broker import Broker
from tests.harness import quiet_telemetry
from tests.helpers.rollouts import fleet_on_v1, ref, seen_by_hub, until
from tests.hub.conftest import Bundles, NodeMaker

T = Topics()

OLD = ModelRef(name="toy", version="1.0.0", manifest_sha256="a" * 64)
NEW = ModelRef(name="toy", version="2.0.0", manifest_sha256="b" * 64)
T0 = 1_000_000.0
IDS = ("node-1", "node-2", "node-3")
FLEET = {i: NodeView(online=True, model=OLD, model_at=T0 - 100) for i in IDS}


def shadowing(
    rule: str | None = "agreement>=0.9,n>=100",
    shadow_for_s: float | None = None,
    max_failures: str = "0",
) -> Rollout:
    policy = RolloutPolicy(waves="1,100%", max_failures=max_failures)
    shadow = ShadowPolicy(rate=1.0, promote_when=rule, shadow_for_s=shadow_for_s)
    return Rollout.create("r1", NEW, "all", list(IDS), FLEET, policy, T0, shadow)


def window(n: int, k: int, wid: str = "w", skipped: int = 0) -> ShadowWindow:
    now = datetime.fromtimestamp(T0, UTC)
    return ShadowWindow(
        window_id=wid,
        started_at=now,
        ended_at=now,
        n=n,
        agreements=k,
        skipped=skipped,
        confusion={"ALL": {"ALL": k, "normal": n - k}} if n else {},
        mean_abs_dp=0.1 if n else None,
        max_abs_dp=0.5 if n else None,
        disagreements=[
            Disagreement(
                image_sha256="c" * 64,
                source="client",
                active_label="ALL",
                candidate_label="normal",
                active={"normal": 0.2, "ALL": 0.8},
                candidate={"normal": 0.7, "ALL": 0.3},
            )
        ]
        if k < n
        else [],
    )


def state(r: Rollout) -> RolloutState:
    """r.state, read afresh (mypy would keep it narrowed across the calls that change it)."""
    return r.state


def feed(r: Rollout, node: str, n: int, k: int, wid: str = "w") -> None:
    assert r.on_shadow(node, ShadowState.SHADOWING, None, window_facts(window(n, k, wid), T0), T0)


def test_the_phase_starts_shadowing_with_orders_and_no_wave() -> None:
    r = shadowing()
    assert state(r) is RolloutState.SHADOWING and r.in_shadow
    assert r.tick(FLEET, T0, T0) == []  # no desired: no node switches
    orders = r.shadow_writes(T0)
    assert {(o.node_id, o.model, o.rate) for o in orders} == {(i, NEW, 1.0) for i in IDS}
    assert r.shadow_writes(T0) == []  # once per hub process


def test_the_rule_promotes_on_the_lower_bound_and_the_waves_begin() -> None:
    r = shadowing()
    r.shadow_writes(T0)
    feed(r, "node-1", 60, 60)
    assert r.tick(FLEET, T0, T0) == [] and state(r) is RolloutState.SHADOWING  # n 60 < 100
    feed(r, "node-2", 60, 58, "w2")  # 118/120: lower bound 0.941 >= 0.9
    lower = wilson(118, 120).ci95
    assert lower is not None and lower[0] >= 0.9
    desired = r.tick(FLEET, T0 + 1, T0 + 1)
    assert state(r) is RolloutState.RUNNING and not r.in_shadow
    assert [d.node_id for d in desired] == ["node-1"]  # wave 1
    assert r.shadow is not None and r.shadow.outcome is not None
    assert "promoted by its rule agreement>=0.9,n>=100" in r.shadow.outcome
    assert "lower bound 0.94" in r.shadow.outcome
    stops = r.shadow_writes(T0 + 1)
    assert {(o.node_id, o.model) for o in stops} == {(i, None) for i in IDS}


def test_a_disagreeing_candidate_aborts_itself_with_its_reason() -> None:
    r = shadowing()
    feed(r, "node-1", 120, 90)  # 0.75: upper bound 0.82 < 0.9
    r.tick(FLEET, T0, T0)
    assert state(r) is RolloutState.ABORTED and not r.in_shadow
    assert r.reason is not None and "disagrees with the serving model" in r.reason
    assert "upper bound 0.8" in r.reason and "90/120" in r.reason
    assert {o.model for o in r.shadow_writes(T0)} == {None}


def test_an_interval_holding_the_threshold_keeps_scoring() -> None:
    r = shadowing()
    feed(r, "node-1", 120, 108)  # 0.90 (0.83-0.94)
    r.tick(FLEET, T0, T0)
    assert state(r) is RolloutState.SHADOWING
    assert r.shadow is not None and "holds 0.9" in r.shadow.verdict().text


def test_without_a_rule_only_the_operator_promotes_and_shadow_for_pauses() -> None:
    r = shadowing(rule=None, shadow_for_s=3600)
    feed(r, "node-1", 500, 500)
    r.tick(FLEET, T0 + 10, T0 + 10)
    assert state(r) is RolloutState.SHADOWING  # perfect agreement, but no rule
    r.tick(FLEET, T0 + 3600, T0 + 3600)
    assert state(r) is RolloutState.PAUSED and r.in_shadow
    assert r.reason is not None and "without promotion" in r.reason
    assert "rollout promote r1" in r.reason
    r.tick(FLEET, T0 + 7200, T0 + 7200)
    assert state(r) is RolloutState.PAUSED  # never promotes silently
    r.resume(T0 + 7200)  # another hour of shadowing
    assert state(r) is RolloutState.SHADOWING
    r.tick(FLEET, T0 + 7300, T0 + 7300)
    assert state(r) is RolloutState.SHADOWING
    r.promote(T0 + 7300)
    assert state(r) is RolloutState.RUNNING
    assert r.shadow is not None and r.shadow.outcome is not None
    assert r.shadow.outcome.startswith("promoted by the operator (agreement 1.000")
    assert [d.node_id for d in r.tick(FLEET, T0 + 7301, T0 + 7301)] == ["node-1"]
    with pytest.raises(RolloutError, match="past its shadow phase"):
        r.promote(T0 + 7302)


def test_a_paused_phase_decides_nothing_until_resumed() -> None:
    r = shadowing()
    r.pause(T0)
    assert state(r) is RolloutState.PAUSED and r.in_shadow
    feed(r, "node-1", 200, 200)
    assert r.tick(FLEET, T0 + 1, T0 + 1) == [] and state(r) is RolloutState.PAUSED
    r.resume(T0 + 2)
    assert [d.node_id for d in r.tick(FLEET, T0 + 2, T0 + 2)] == ["node-1"]


def test_targets_that_cannot_load_the_candidate_fail_the_phase() -> None:
    r = shadowing(max_failures="1")
    why = (UpdateErrorCode.INSUFFICIENT_MEMORY, "needs about 300 MiB")
    assert r.on_shadow("node-2", ShadowState.FAILED, why, None, T0)
    r.tick(FLEET, T0, T0)
    assert state(r) is RolloutState.SHADOWING  # 1 failure: max_failures 1
    r.on_shadow("node-3", ShadowState.FAILED, (UpdateErrorCode.INCOMPATIBLE, "labels"), None, T0)
    r.tick(FLEET, T0, T0)
    assert state(r) is RolloutState.ABORTED
    assert r.reason is not None and "shadow phase failed: 2 of 3 nodes" in r.reason
    assert "node-2: insufficient_memory: needs about 300 MiB" in r.reason
    info = describe(r, now=T0)
    assert info.shadow is not None and info.shadow.failed == 2
    node2 = next(n for n in info.shadow.nodes if n.node_id == "node-2")
    assert node2.error is not None and node2.error.code is UpdateErrorCode.INSUFFICIENT_MEMORY


def test_reports_of_strangers_are_not_taken() -> None:
    r = shadowing()
    assert not r.on_shadow("node-9", ShadowState.SHADOWING, None, None, T0)
    plain = Rollout.create("r2", NEW, "all", list(IDS), FLEET, RolloutPolicy(), T0)
    assert not plain.on_shadow("node-1", ShadowState.SHADOWING, None, None, T0)
    with pytest.raises(RolloutError, match="had no shadow phase"):
        plain.promote(T0)


def test_the_status_pools_evidence_with_its_interval(tmp_path: Path) -> None:
    r = shadowing()
    feed(r, "node-1", 40, 38)
    feed(r, "node-2", 10, 10, "w2")
    s = describe(r, now=T0).shadow
    assert s is not None
    assert (s.agreement.k, s.agreement.n) == (48, 50)
    assert s.agreement.ci95 == wilson(48, 50).ci95
    assert s.confusion == {"ALL": {"ALL": 48, "normal": 2}} and s.labels == ["ALL", "normal"]
    assert s.progress == 0.5 and s.n_required == 100 and s.threshold == 0.9
    assert s.mean_abs_dp == pytest.approx(0.1) and s.max_abs_dp == 0.5
    assert [d.image_sha256 for d in s.disagreements] == ["c" * 64]
    assert "(95% CI 0.865-0.989, 48/50); the rule waits for 100 images" in s.verdict


def test_a_window_is_stored_once_and_the_evidence_survives_a_restart(tmp_path: Path) -> None:
    db = Database(tmp_path / "hub.db")
    r = shadowing()
    db.save_rollout(r, r.events, T0)
    w = window(30, 29, "boot1-1")
    assert db.add_shadow_window("r1", "node-1", w, T0)
    feed(r, "node-1", 30, 29, "boot1-1")
    assert not db.add_shadow_window("r1", "node-1", w, T0 + 1)  # redelivered: not twice
    r.on_shadow("node-2", ShadowState.FAILED, (UpdateErrorCode.COMPILE_ERROR, "x"), None, T0)
    db.save_rollout(r, r.events, T0)
    db.close()
    again = Database(tmp_path / "hub.db").rollout("r1")
    assert again is not None and again.state is RolloutState.SHADOWING
    assert again.shadow is not None and again.shadow.policy == r.shadow.policy  # type: ignore[union-attr]
    total = again.shadow.totals()
    assert (total.n, total.agreements) == (30, 29)
    t2 = again.get("node-2")
    assert t2 is not None and t2.shadow_state is ShadowState.FAILED
    assert t2.shadow_error_code is UpdateErrorCode.COMPILE_ERROR


@pytest.mark.parametrize(
    ("text", "rate"), [("20%", 0.2), ("100%", 1.0), ("0.05", 0.05), ("1", 1.0), ("2.5%", 0.025)]
)
def test_shadow_rates(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["0%", "0", "150%", "1.5", "-1", "abc", "", "20 %%"])
def test_bad_shadow_rates(text: str) -> None:
    with pytest.raises(ShadowSpecError, match="shadow rate"):
        parse_rate(text)


def test_promotion_rules_and_durations() -> None:
    assert str(parse_promote_when("agreement>=0.97,n>=300")) == "agreement>=0.97,n>=300"
    assert parse_promote_when(" n >= 50 , agreement >= 95% ").threshold == pytest.approx(0.95)
    for bad in ("n>=300", "agreement>0.9", "agreement>=1.5", "agreement>=0.9,n>=0", "x>=1"):
        with pytest.raises(ShadowSpecError, match="promote-when"):
            parse_promote_when(bad)
    assert parse_duration("2h") == 7200 and parse_duration("90") == 90
    for bad in ("0s", "2 weeks", "91d", ""):
        with pytest.raises(ShadowSpecError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ShadowSpecError, match="need a shadow phase"):
        RolloutStartArgs(name="toy", version="2.0.0", promote_when="agreement>=0.9").shadow_policy()
    args = RolloutStartArgs(name="toy", version="2.0.0", shadow="20%", shadow_for_s=60)
    assert args.shadow_policy() == ShadowPolicy(rate=0.2, shadow_for_s=60)


def test_nodes_without_shadow_support_go_on_with_a_hub_that_has_it(
    hub: HubService,
    operator: HubClient,
    bundles: Bundles,
    fake_nodes: NodeMaker,
    broker: Broker,
) -> None:
    """Scripted nodes of before the shadow phase (they never read a shadow order, and
    send telemetry without drift figures): the phase gathers nothing from them, the
    operator promotes, and they update as ever."""
    nodes = fleet_on_v1(bundles, fake_nodes)
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    plain = broker.connect("node-1")
    assert plain.publish_wait(T.telemetry("node-1"), quiet_telemetry("node-1").to_json())
    args = RolloutStartArgs(name="toy", version="2.0.0", shadow="20%", shadow_for_s=3600)
    info = operator.rollout_start(args)
    assert info.state is RolloutState.SHADOWING and info.shadow is not None
    assert {n.state for n in info.shadow.nodes} == {None}  # no node has said a word
    assert all(n.desired == [] for n in nodes)
    promoted = operator.rollout_verb("promote", info.rollout_id)
    assert promoted.state is RolloutState.RUNNING
    done = until(operator, info.rollout_id, lambda i: i.state is RolloutState.COMPLETED)
    assert done.shadow is not None and done.shadow.outcome is not None
    assert done.shadow.outcome.startswith("promoted by the operator (no image scored yet)")
    assert all(n.model == ref(bundles, "2.0.0") for n in nodes)
    with pytest.raises(ApiFailure, match="past its shadow phase"):
        operator.rollout_verb("promote", info.rollout_id)
