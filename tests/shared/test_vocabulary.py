"""One vocabulary: one ModelRef with the wire keys DESIGN.md fixes, one enum per state
machine and per error-code family, one strict base, and the lists the hub's CLI and
page derive from them."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError

from cellwatch.hub import render
from cellwatch.hub.web.rolloutviews import BAR_GROUPS
from cellwatch.shared import hubapi, manifest, schemas
from cellwatch.shared.base import Strict
from cellwatch.shared.cli import friendly_errors
from cellwatch.shared.codes import ModelErrorCode, as_update_error
from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.schemas import (
    ApiReply,
    DesiredModel,
    Latency,
    ModelRef,
    NodeStatus,
    Result,
    Revocation,
    Telemetry,
    UpdateReport,
)
from cellwatch.shared.states import (
    ACTIVE_ROLLOUT_STATES,
    FINISHED_ROLLOUT_STATES,
    TONE_GROUPS,
    TONES,
    DriftState,
    NodeState,
    RolloutState,
    ShadowState,
    Tone,
    UpdateState,
)
from cellwatch.training.errors import GateError

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SHA = "ab" * 32
REF = ModelRef(name="toy", version="1.0.0", manifest_sha256=SHA)


def test_results_and_statuses_write_the_hash_as_sha256_and_read_it_back() -> None:
    result = Result(
        status="ok",
        image_id="i",
        source=None,
        node_id="node-1",
        model=REF,
        received_at=NOW,
        completed_at=NOW,
    )
    status = NodeStatus(
        node_id="node-1", state=NodeState.ONLINE, boot_id="b" * 8, since=NOW, model=REF
    )
    for message, kind in ((result, Result), (status, NodeStatus)):
        wire = json.loads(message.to_json())
        assert wire["model"] == {"name": "toy", "version": "1.0.0", "sha256": SHA}
        back = kind.model_validate_json(message.to_json())
        assert back.model == REF and back.model.manifest_sha256 == SHA


def test_desired_models_and_reports_write_manifest_sha256() -> None:
    desired = DesiredModel(rollout_id="r1", model=REF, issued_at=NOW)
    report = UpdateReport(
        rollout_id="r1", model=REF, state=UpdateState.ACTIVE, progress=1.0, ts=NOW
    )
    for message in (desired, report):
        wire = json.loads(message.to_json())
        assert wire["model"] == {"name": "toy", "version": "1.0.0", "manifest_sha256": SHA}
    revocation = Revocation(
        name="toy", version="1.0.0", manifest_sha256=SHA, reason="bad", revoked_at=NOW
    )
    assert json.loads(revocation.to_json())["manifest_sha256"] == SHA
    assert ModelRef(**{"name": "toy", "version": "1.0.0", "sha256": SHA}) == REF


def test_a_model_ref_is_a_value() -> None:
    same = ModelRef.model_validate({"name": "toy", "version": "1.0.0", "sha256": SHA})
    assert same == REF and hash(same) == hash(REF) and str(REF) == "toy 1.0.0"
    with pytest.raises(ValidationError):
        ModelRef(name="toy", version="1.0.0", manifest_sha256="not a hash")


def test_every_model_error_is_an_update_error() -> None:
    for code in ModelErrorCode:
        assert as_update_error(code).value == code.value


def test_error_codes_outside_their_family_are_refused() -> None:
    report = {
        "schema": "cellwatch.update/1",
        "rollout_id": "r1",
        "model": REF.model_dump(),
        "state": "failed",
        "progress": 0.0,
        "error": {"code": "made_up", "message": "?"},
        "ts": NOW.isoformat(),
    }
    with pytest.raises(ValidationError, match="code"):
        UpdateReport.model_validate(report)
    report["error"] = {"code": "fetch_failed", "message": "stalled"}
    assert UpdateReport.model_validate(report).error is not None
    reply = {"request_id": "x", "ok": False, "error": {"code": "fetch_failed", "message": "?"}}
    with pytest.raises(ValidationError, match="code"):  # an update code is no API code
        ApiReply.model_validate(reply)


def _subclasses(base: type[BaseModel]) -> set[type[BaseModel]]:
    found: set[type[BaseModel]] = set()
    for sub in base.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def test_every_message_and_api_model_is_strict() -> None:
    modules = {schemas.__name__, hubapi.__name__, manifest.__name__}
    models = {m for m in _subclasses(BaseModel) if m.__module__ in modules}
    assert len(models) > 40
    for m in models:
        assert issubclass(m, Strict), m
        assert m.model_config.get("extra") == "forbid" and m.model_config.get("frozen"), m


def test_telemetry_keeps_refusing_nan_on_top_of_the_strict_base() -> None:
    assert Latency.model_config.get("extra") == "forbid"
    with pytest.raises(ValidationError):
        Latency(p50=math.nan, p95=1.0, p99=1.0)
    assert Telemetry.model_config.get("allow_inf_nan") is False


def test_the_wave_bar_shows_every_target_state_exactly_once() -> None:
    shown = [s for _, states in BAR_GROUPS for s in states]
    assert sorted(shown) == sorted(UpdateState)


def test_every_state_has_one_tone_and_every_tone_a_colour() -> None:
    # StrEnum members compare by value: tell them apart by (enum, value)
    listed = [(type(s), s.value) for _, states in TONE_GROUPS for s in states]
    enums = (UpdateState, RolloutState, NodeState, ShadowState, DriftState)
    assert len(listed) == len(set(listed))  # each member once
    assert set(listed) == {(e, s.value) for e in enums for s in e}
    tones = {v: {t for t, group in TONE_GROUPS for s in group if s.value == v} for _, v in listed}
    assert all(len(t) == 1 for t in tones.values())  # a value two enums share: one tone
    assert {v for v in tones if sum(value == v for _, value in listed) > 1} == {
        "rolled_back",
        "shadowing",
        "failed",
    }
    assert set(TONES) == set(tones)
    assert set(render.TONE_STYLES) == set(Tone)


def test_a_rollout_is_either_active_or_over() -> None:
    assert frozenset(RolloutState) == FINISHED_ROLLOUT_STATES | ACTIVE_ROLLOUT_STATES
    assert not FINISHED_ROLLOUT_STATES & ACTIVE_ROLLOUT_STATES


def test_messages_carry_only_the_states_their_sender_may_say() -> None:
    """One enum per state machine; a node's status and report carry some of its states,
    refused in the words of before (when the wire had a list of its own)."""
    status = {"node_id": "node-1", "boot_id": "b" * 8, "since": NOW.isoformat()}
    assert NodeStatus.model_validate({**status, "state": "offline"}).state is NodeState.OFFLINE
    for said in ("stale", "conflict", "bogus"):
        with pytest.raises(ValidationError, match="Input should be 'online' or 'offline'"):
            NodeStatus.model_validate({**status, "state": said})
    report = {"rollout_id": "r1", "model": REF, "progress": 0.0, "ts": NOW}
    assert UpdateReport.model_validate({**report, "state": "pending"}).state is UpdateState.PENDING
    with pytest.raises(ValidationError, match=r"Input should be 'pending', .* or 'rolled_back'"):
        UpdateReport.model_validate({**report, "state": "waiting"})


def test_friendly_errors_use_the_error_class_exit_code() -> None:
    def run(exc: BaseException) -> tuple[int, str]:
        @friendly_errors
        def command() -> None:
            raise exc

        runner = CliRunner()
        result = runner.invoke(click.command()(command), [])
        return result.exit_code, result.output

    assert run(CellwatchError("bad config")) == (2, "error: bad config\n")
    assert run(GateError("agreement 0.91 < 0.98")) == (3, "error: agreement 0.91 < 0.98\n")
    assert run(KeyboardInterrupt()) == (130, "interrupted\n")
