"""The API's view of a rollout (`RolloutInfo`): its waves, its targets and its shadow
phase, as `rollout status`, `rollout list` and the fleet page show it."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime

from cellwatch.hub.rollout import Rollout
from cellwatch.hub.shadowing import shadow_info
from cellwatch.shared.hubapi import RolloutInfo, TargetInfo, WaveInfo
from cellwatch.shared.schemas import UpdateError


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def describe(
    r: Rollout,
    *,
    existing: bool = False,
    model_flags: list[str] | None = None,
    now: float | None = None,
) -> RolloutInfo:
    """The API's view of a rollout."""
    previous = 0
    waves = []
    for index, count in enumerate(r.plan):
        members = r.wave_targets(index)
        waves.append(
            WaveInfo(
                index=index,
                size=count - previous,
                issued=index <= r.wave,
                counts=dict(Counter(t.state for t in members)),
            )
        )
        previous = count
    return RolloutInfo(
        rollout_id=r.rollout_id,
        model=r.model,
        target=r.target,
        state=r.state,
        reason=r.reason,
        policy=r.policy,
        wave=r.wave,
        waves=waves,
        counts=dict(r.counts()),
        targets=[
            TargetInfo(
                node_id=t.node_id,
                wave=t.wave,
                phase=t.phase,
                state=t.state,
                progress=t.progress,
                error=UpdateError(code=t.error_code, message=t.error_message or "")
                if t.error_code
                else None,
                previous=t.previous,
                issued_at=_ts(t.issued_at) if t.issued_at is not None else None,
                finished_at=_ts(t.finished_at) if t.finished_at is not None else None,
            )
            for t in r.targets
        ],
        created_at=_ts(r.created_at),
        updated_at=_ts(r.updated_at),
        finished_at=_ts(r.finished_at) if r.finished_at is not None else None,
        existing=existing,
        model_flags=model_flags or [],
        shadow=shadow_info(r.shadow, r.targets, time.time() if now is None else now)
        if r.shadow is not None
        else None,
    )
