"""The rollout state machine without I/O: waves, advance, abort, timeouts, verbs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellwatch.hub.db import Database
from cellwatch.hub.errors import RolloutError
from cellwatch.hub.rollout import Rollout
from cellwatch.hub.targets import Desired, NodeView, Target
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.hubapi import RolloutPolicy, RolloutStartArgs
from cellwatch.shared.schemas import ModelRef
from cellwatch.shared.states import RolloutState, UpdateState
from cellwatch.shared.waves import WaveSpecError, parse_threshold, parse_waves, plan_waves

OLD = ModelRef(name="toy", version="1.0.0", manifest_sha256="a" * 64)
NEW = ModelRef(name="toy", version="2.0.0", manifest_sha256="b" * 64)
T0 = 1_000_000.0


@pytest.mark.parametrize(
    ("total", "spec", "counts"),
    [
        (3, "1,25%,100%", [1, 3]),
        (10, "1,25%,100%", [1, 3, 10]),
        (4, "1,50%", [1, 2, 4]),
        (1, "1,25%,100%", [1]),
        (5, "100%", [5]),
        (5, "2,2,3", [2, 3, 5]),
        (200, "1,10%,50%,100%", [1, 20, 100, 200]),
        (3, "10", [3]),
    ],
)
def test_waves(total: int, spec: str, counts: list[int]) -> None:
    assert plan_waves(total, parse_waves(spec)) == counts


@pytest.mark.parametrize("spec", ["", "0", "x", "150%", "1,-2", "1.5", ",".join(["1"] * 21)])
def test_bad_waves(spec: str) -> None:
    with pytest.raises(WaveSpecError):
        parse_waves(spec)


def test_thresholds() -> None:
    assert parse_threshold("0").of(10) == 0
    assert parse_threshold("2").of(10) == 2
    assert parse_threshold("10%").of(20) == 2


def test_a_start_request_overrides_the_hub_policy_field_by_field() -> None:
    defaults = RolloutPolicy(waves="1,100%", node_timeout_s=60)
    args = RolloutStartArgs(
        name="toy", version="2.0.0", waves="", max_failures="10%", min_executed=3
    )
    assert args.policy(defaults) == RolloutPolicy(
        waves="1,100%", max_failures="10%", min_executed=3, node_timeout_s=60
    )  # an empty text, like a field left out, keeps the default
    with pytest.raises(WaveSpecError, match="neither a node count"):
        RolloutStartArgs(name="toy", version="2.0.0", waves="1,x").policy(defaults)
    with pytest.raises(WaveSpecError, match="neither a node count"):
        RolloutStartArgs(name="toy", version="2.0.0", max_failures="few").policy(defaults)


def fleet(*ids: str, online: bool = True, model: ModelRef | None = OLD) -> dict[str, NodeView]:
    return {i: NodeView(online=online, model=model, model_at=T0 - 100) for i in ids}


def make(
    n: int = 3,
    waves: str = "1,25%,100%",
    *,
    advance_at: float = 1.0,
    max_failures: str = "0",
    min_executed: int = 1,
    timeout: float = 60.0,
    views: dict[str, NodeView] | None = None,
) -> tuple[Rollout, dict[str, NodeView]]:
    ids = [f"node-{i}" for i in range(1, n + 1)]
    views = views if views is not None else fleet(*ids)
    policy = RolloutPolicy(
        waves=waves,
        advance_at=advance_at,
        max_failures=max_failures,
        min_executed=min_executed,
        node_timeout_s=timeout,
    )
    return Rollout.create("r1", NEW, "all", ids, views, policy, T0), views


def report(
    r: Rollout, node: str, state: UpdateState, now: float = T0, sha: str = NEW.manifest_sha256
) -> bool:
    error = (
        (UpdateErrorCode.SELF_TEST_FAILED, "golden mismatch")
        if state is UpdateState.FAILED
        else None
    )
    return r.on_report(node, "r1", sha, state, 1.0, error, now)


def issued(desired: list[Desired]) -> list[str]:
    return [d.node_id for d in desired]


def state(r: Rollout) -> RolloutState:
    """The rollout's state (a call, so mypy does not narrow it between steps)."""
    return r.state


def target(r: Rollout, node_id: str) -> Target:
    t = r.get(node_id)
    assert t is not None
    return t


def test_waves_advance_when_active_then_complete() -> None:
    r, views = make()
    assert issued(r.tick(views, T0)) == ["node-1"]
    assert r.tick(views, T0 + 1) == []  # canary not active yet
    assert report(r, "node-1", UpdateState.DOWNLOADING)
    assert target(r, "node-1").state == "downloading"
    assert report(r, "node-1", UpdateState.ACTIVE)
    assert issued(r.tick(views, T0 + 2)) == ["node-2", "node-3"]
    report(r, "node-2", UpdateState.ACTIVE)
    assert r.tick(views, T0 + 3) == [] and state(r) is RolloutState.RUNNING
    report(r, "node-3", UpdateState.ACTIVE)
    r.tick(views, T0 + 4)
    assert state(r) is RolloutState.COMPLETED and r.reason == "3 of 3 nodes active"
    assert r.finished_at == T0 + 4


def test_a_node_already_running_the_target_is_active_at_once() -> None:
    views = fleet("node-1", "node-2", model=NEW)
    r, _ = make(2, "1,100%", views=views)
    desired = r.tick(views, T0)
    assert issued(desired) == ["node-1", "node-2"]  # desired still written (retained truth)
    assert state(r) is RolloutState.COMPLETED


def test_reports_for_other_rollouts_or_models_are_ignored() -> None:
    r, views = make()
    r.tick(views, T0)
    assert not r.on_report("node-1", "r9", NEW.manifest_sha256, UpdateState.ACTIVE, 1, None, T0)
    assert not report(r, "node-1", UpdateState.ACTIVE, sha=OLD.manifest_sha256)
    assert not report(r, "node-2", UpdateState.ACTIVE)  # its wave is not issued
    assert target(r, "node-1").state == "pending"


def test_first_failure_aborts_before_later_waves() -> None:
    r, views = make(3, "1,2,100%")
    r.tick(views, T0)
    report(r, "node-1", UpdateState.ACTIVE)
    assert issued(r.tick(views, T0 + 1)) == ["node-2"]
    report(r, "node-2", UpdateState.FAILED)
    assert r.tick(views, T0 + 2) == []
    assert state(r) is RolloutState.ABORTED and "max_failures 0" in (r.reason or "")
    assert target(r, "node-3").state == "waiting"
    assert target(r, "node-2").error_code == "self_test_failed"


def test_min_executed_holds_the_abort_rule_back() -> None:
    r, views = make(4, "2,100%", advance_at=0.5, min_executed=3)
    assert issued(r.tick(views, T0)) == ["node-1", "node-2"]
    report(r, "node-1", UpdateState.FAILED)
    assert r.tick(views, T0 + 1) == [] and state(r) is RolloutState.RUNNING
    report(r, "node-2", UpdateState.ACTIVE)  # 1 of 2 active reaches advance_at 50%
    assert issued(r.tick(views, T0 + 2)) == ["node-3", "node-4"]
    report(r, "node-3", UpdateState.ACTIVE)  # 3 finished, 1 failure > 0: abort
    r.tick(views, T0 + 3)
    assert state(r) is RolloutState.ABORTED


def test_max_failures_tolerates_and_a_short_wave_aborts() -> None:
    r, views = make(2, "100%", max_failures="1")
    r.tick(views, T0)
    report(r, "node-1", UpdateState.FAILED)
    r.tick(views, T0 + 1)
    assert state(r) is RolloutState.RUNNING  # 1 failure is not more than 1
    report(r, "node-2", UpdateState.ACTIVE)
    r.tick(views, T0 + 2)
    assert state(r) is RolloutState.ABORTED and "below advance_at" in (r.reason or "")
    r2, views = make(2, "100%", max_failures="50%", advance_at=0.5)
    r2.tick(views, T0)
    report(r2, "node-1", UpdateState.FAILED)
    report(r2, "node-2", UpdateState.ACTIVE)
    r2.tick(views, T0 + 1)
    assert state(r2) is RolloutState.COMPLETED and r2.reason == "1 of 2 nodes active, 1 failed"


def test_timeout_counts_as_failure_and_a_late_active_still_counts() -> None:
    r, views = make(3, "2,100%", timeout=60, max_failures="1", advance_at=0.5)
    r.tick(views, T0)
    report(r, "node-2", UpdateState.ACTIVE)
    assert issued(r.tick(views, T0 + 60)) == ["node-3"]  # 1 of 2 reaches 50%
    assert target(r, "node-1").state == "pending"
    r.tick(views, T0 + 61)
    t = target(r, "node-1")
    assert t.state == "timed_out" and t.error_code == "timed_out"
    assert r.failures() == 1 and state(r) is RolloutState.RUNNING
    report(r, "node-1", UpdateState.ACTIVE, now=T0 + 70)
    assert r.failures() == 0 and target(r, "node-1").error_code is None
    report(r, "node-3", UpdateState.ACTIVE, now=T0 + 71)
    r.tick(views, T0 + 72)
    assert state(r) is RolloutState.COMPLETED


def test_offline_nodes_do_not_time_out_until_they_return() -> None:
    views = fleet("node-1", online=False)
    r, _ = make(1, "100%", timeout=60, views=views)
    r.tick(views, T0)
    r.tick(views, T0 + 10_000)
    assert target(r, "node-1").state == "pending"
    back = fleet("node-1", online=True)
    r.tick(back, T0 + 10_001)  # the clock starts now
    r.tick(back, T0 + 10_060)
    assert target(r, "node-1").state == "pending"
    r.tick(back, T0 + 10_062)
    assert target(r, "node-1").state == "timed_out" and state(r) is RolloutState.ABORTED


def test_a_status_showing_the_target_counts_when_a_report_was_lost() -> None:
    r, views = make(1, "100%")
    r.tick(views, T0)
    r.tick({"node-1": NodeView(True, NEW, model_at=T0 - 1)}, T0 + 1)  # older than the issue
    assert state(r) is RolloutState.RUNNING
    r.tick({"node-1": NodeView(True, NEW, model_at=T0 + 2)}, T0 + 2)
    assert state(r) is RolloutState.COMPLETED


def test_pause_resume_abort() -> None:
    r, views = make(3, "1,100%")
    r.tick(views, T0)
    r.pause(T0 + 1)
    r.pause(T0 + 1)  # idempotent
    report(r, "node-1", UpdateState.ACTIVE)
    assert r.tick(views, T0 + 2) == [] and state(r) is RolloutState.PAUSED
    r.resume(T0 + 3)
    assert issued(r.tick(views, T0 + 3)) == ["node-2", "node-3"]
    r.abort(T0 + 4)
    assert state(r) is RolloutState.ABORTED and r.reason == "aborted by the operator"
    assert report(r, "node-2", UpdateState.ACTIVE)  # reports still recorded
    assert r.tick(views, T0 + 5) == []
    with pytest.raises(RolloutError):
        r.pause(T0 + 6)
    with pytest.raises(RolloutError):
        r.resume(T0 + 6)


def test_rollback_sends_switched_nodes_to_their_previous_model() -> None:
    views = fleet("node-1", "node-2", "node-3")
    views["node-3"] = NodeView(True, None)  # ran nothing before: left alone
    r, _ = make(4, "100%", views={**views, "node-4": NodeView(True, OLD)})
    r.tick({**views, "node-4": NodeView(True, OLD)}, T0)
    report(r, "node-1", UpdateState.ACTIVE)
    report(r, "node-2", UpdateState.FAILED)
    desired = r.rollback(views, T0 + 1)
    assert [(d.node_id, d.model, d.rollout_id) for d in desired] == [
        ("node-1", OLD, "r1"),
        ("node-2", OLD, "r1"),
        ("node-4", OLD, "r1"),
    ]
    assert state(r) is RolloutState.ROLLING_BACK
    assert r.rollback(views, T0 + 1) == []  # idempotent
    assert not report(r, "node-1", UpdateState.ACTIVE)  # the new model: not what we want now
    for node in ("node-1", "node-2", "node-4"):
        report(r, node, UpdateState.ACTIVE, sha=OLD.manifest_sha256)
    r.tick(views, T0 + 2)
    assert state(r) is RolloutState.ROLLED_BACK and r.reason == "3 of 3 nodes rolled back"
    assert target(r, "node-1").state == "rolled_back"
    assert target(r, "node-3").state == "pending"
    with pytest.raises(RolloutError):
        r.rollback(views, T0 + 3)


def test_rollback_of_nothing_is_done_at_once() -> None:
    r, views = make(2, "1,100%")
    r.pause(T0)
    r.rollback(views, T0 + 1)
    assert state(r) is RolloutState.ROLLED_BACK


def test_confirmations_and_unconfirmed_desired() -> None:
    r, views = make(2, "100%")
    r.tick(views, T0)
    assert issued(r.unconfirmed()) == ["node-1", "node-2"]
    assert r.confirm("node-1", NEW.manifest_sha256)
    assert not r.confirm("node-1", OLD.manifest_sha256)
    assert issued(r.unconfirmed()) == ["node-2"]


def test_database_round_trip(tmp_path: Path) -> None:
    db = Database(tmp_path / "hub.db")
    r, views = make(3, "1,100%")
    r.tick(views, T0)
    report(r, "node-1", UpdateState.FAILED)
    db.save_rollout(r)
    loaded = db.rollout("r1")
    assert loaded == r
    assert [x.rollout_id for x in db.rollouts(active_only=True)] == ["r1"]
    r.abort(T0 + 1)
    db.save_rollout(r)
    assert db.rollouts(active_only=True) == []
    assert db.next_rollout_id() == "r1" and db.next_rollout_id() == "r2"
    db.close()


DAY = 86_400.0


def test_a_wall_clock_step_times_nothing_out() -> None:
    """Timers run on the monotonic clock (`mono`): the wall clock jumping a day
    forward (NTP, an operator) times no target out; a full node_timeout_s does."""
    r, views = make(2, "100%", timeout=60, max_failures="2")
    r.tick(views, T0, mono=5.0)
    r.tick(views, T0 + DAY, mono=6.0)
    assert {t.state for t in r.targets} == {"pending"}
    r.tick(views, T0 + DAY, mono=5.0 + 60)
    assert {t.state for t in r.targets} == {"pending"}
    r.tick(views, T0 - DAY, mono=5.0 + 61)  # and a step back delays nothing
    assert {t.state for t in r.targets} == {"timed_out"}


def test_deadlines_survive_a_restart_of_the_hub(tmp_path: Path) -> None:
    """A reloaded rollout's timers go on from the stored clock start (wall time, the
    durable deadline clock_from + node_timeout_s) on the new process's monotonic
    clock; a wall clock set back while the hub was down gives no more than a full
    timeout."""
    db = Database(tmp_path / "hub.db")
    r, views = make(2, "100%", timeout=60, max_failures="2")
    r.tick(views, T0, mono=5.0)
    db.save_rollout(r)
    loaded = db.rollout("r1")
    assert loaded is not None and all(t.deadline is None for t in loaded.targets)
    # The hub restarts 20 s later; its monotonic clock starts anew.
    loaded.tick(views, T0 + 20, mono=1.0)
    loaded.tick(views, T0 + 1000, mono=1.0 + 40)  # 40 s of the 60 left: a wall step
    assert {t.state for t in loaded.targets} == {"pending"}
    loaded.tick(views, T0 + 1000, mono=1.0 + 41)
    assert {t.state for t in loaded.targets} == {"timed_out"}
    back = db.rollout("r1")
    assert back is not None
    back.tick(views, T0 - DAY, mono=0.0)  # the wall clock went back a day
    back.tick(views, T0 - DAY, mono=60.0)
    assert {t.state for t in back.targets} == {"pending"}
    back.tick(views, T0 - DAY, mono=61.0)
    assert {t.state for t in back.targets} == {"timed_out"}
    db.close()


def test_a_node_whose_site_is_unreachable_does_not_time_out_until_it_is_back() -> None:
    r, views = make(1, "100%", timeout=60)
    r.tick(views, T0)  # issued to an online node: its clock runs
    r.tick(views, T0 + 50)
    away = {"node-1": NodeView(online=False, model=OLD, model_at=T0 - 100, reachable=False)}
    r.tick(away, T0 + 55)  # its site's link dropped: the clock stops
    r.tick(away, T0 + 10_000)
    assert target(r, "node-1").state == "pending" and state(r) is RolloutState.RUNNING
    back = fleet("node-1")
    r.tick(back, T0 + 10_001)  # back online: a full timeout from now
    r.tick(back, T0 + 10_060)
    assert target(r, "node-1").state == "pending"
    r.tick(back, T0 + 10_062)
    assert target(r, "node-1").state == "timed_out"
