"""A rollout's shadow phase: the evidence its targets send and what the rule makes of it
(pure, no I/O; hub/rollout.py moves the rollout, the orchestrator stores the windows).

Each target node scores a share of its live images with the candidate beside its
serving model and reports closed windows (`ShadowWindow`: n, agreements, confusion,
|Δp|, latencies, skipped, the disagreeing images' hashes). The hub stores each window
once (a window id is unique per node process and window: hub/db.py) and pools them
here, per node and over the rollout.

The rule (`--promote-when agreement>=X,n>=N`) is judged on the Wilson 95% interval of
the pooled agreement, once at least N images were scored:
- the lower bound reaches X: promote (the waves begin);
- the upper bound is below X: the candidate aborts itself, with the figures as its
  reason;
- otherwise keep scoring. The phase pauses for the operator when `--shadow-for` is up:
  it never promotes silently.
The hub looks again after every window, so a candidate that sits exactly at X is
judged many times; the 95% interval then wrongly clears (or sinks below) X in more
than 2.5% of phases, which `--shadow-for` bounds. A larger N narrows the interval
before the first look.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.figures import Proportion, wilson
from cellwatch.shared.hubapi import (
    NodeDisagreement,
    ShadowInfo,
    ShadowLatency,
    ShadowNodeInfo,
    ShadowPolicy,
)
from cellwatch.shared.schemas import Disagreement, UpdateError
from cellwatch.shared.states import ShadowState

RECENT_DISAGREEMENTS = 10
"""Disagreeing images the rollout's status shows (the latest)."""


class ShadowTarget(Protocol):
    """What the phase's view needs of a rollout target (hub/targets.py's Target)."""

    @property
    def node_id(self) -> str: ...
    @property
    def shadow_state(self) -> ShadowState | None: ...
    @property
    def shadow_error_code(self) -> UpdateErrorCode | None: ...
    @property
    def shadow_error_message(self) -> str | None: ...


@dataclass(frozen=True)
class WindowFacts:
    """What one stored window adds to the evidence."""

    n: int
    agreements: int
    skipped: int
    confusion: dict[str, dict[str, int]]
    mean_abs_dp: float | None
    max_abs_dp: float | None
    active_p50: float | None
    active_p99: float | None
    candidate_p50: float | None
    candidate_p99: float | None
    disagreements: tuple[Disagreement, ...]
    received_at: float


@dataclass
class NodeEvidence:
    """One target's windows, pooled."""

    n: int = 0
    agreements: int = 0
    skipped: int = 0
    windows: int = 0
    confusion: dict[str, Counter[str]] = field(default_factory=dict)
    dp_sum: float = 0.0
    dp_max: float | None = None
    latency_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    latency_weight: float = 0.0
    last_at: float | None = None

    def add(self, w: WindowFacts) -> None:
        self.n += w.n
        self.agreements += w.agreements
        self.skipped += w.skipped
        self.windows += 1
        for active, row in w.confusion.items():
            self.confusion.setdefault(active, Counter()).update(row)
        if w.n and w.mean_abs_dp is not None:
            self.dp_sum += w.mean_abs_dp * w.n
        if w.max_abs_dp is not None:
            self.dp_max = max(self.dp_max or 0.0, w.max_abs_dp)
        lat = (w.active_p50, w.active_p99, w.candidate_p50, w.candidate_p99)
        if w.n and all(v is not None for v in lat):
            for i, v in enumerate(lat):
                assert v is not None
                self.latency_sums[i] += v * w.n
            self.latency_weight += w.n
        self.last_at = max(self.last_at or w.received_at, w.received_at)

    @property
    def agreement(self) -> Proportion:
        return wilson(self.agreements, self.n)


@dataclass(frozen=True)
class Verdict:
    action: str
    """`promote`, `abort` or `wait`."""
    text: str


@dataclass
class ShadowPhase:
    policy: ShadowPolicy
    started_at: float
    """When the phase (or, after a resume, its current period) began: wall time, stored;
    `shadow_for_s` counts from it."""
    ended_at: float | None = None
    outcome: str | None = None
    deadline: float | None = field(default=None, compare=False)
    """Monotonic end of the current period (not stored: recomputed from started_at)."""
    nodes: dict[str, NodeEvidence] = field(default_factory=dict, compare=False)
    recent: deque[tuple[str, Disagreement]] = field(
        default_factory=lambda: deque(maxlen=RECENT_DISAGREEMENTS), compare=False
    )
    announced: bool = field(default=False, compare=False)
    """The orders (or, once the phase ended, the stops) were written since the hub
    started: not stored, so a restarted hub writes them again."""

    @property
    def open(self) -> bool:
        return self.ended_at is None

    def add(self, node_id: str, w: WindowFacts) -> None:
        self.nodes.setdefault(node_id, NodeEvidence()).add(w)
        for d in w.disagreements:
            self.recent.append((node_id, d))

    def totals(self) -> NodeEvidence:
        pooled = NodeEvidence()
        for e in self.nodes.values():
            pooled.n += e.n
            pooled.agreements += e.agreements
            pooled.skipped += e.skipped
            pooled.windows += e.windows
            for active, row in e.confusion.items():
                pooled.confusion.setdefault(active, Counter()).update(row)
            pooled.dp_sum += e.dp_sum
            if e.dp_max is not None:
                pooled.dp_max = max(pooled.dp_max or 0.0, e.dp_max)
            pooled.latency_sums = [
                a + b for a, b in zip(pooled.latency_sums, e.latency_sums, strict=True)
            ]
            pooled.latency_weight += e.latency_weight
            if e.last_at is not None:
                pooled.last_at = max(pooled.last_at or e.last_at, e.last_at)
        return pooled

    def verdict(self) -> Verdict:
        """What the rule makes of the pooled evidence now."""
        total = self.totals()
        a = total.agreement
        figure = describe_agreement(a)
        rule = self.policy.rule()
        if rule is None:
            return Verdict("wait", f"{figure}; no promotion rule: promote with `rollout promote`")
        need = max(rule.n, 1)
        if total.n < need:
            return Verdict("wait", f"{figure}; the rule waits for {need} images")
        assert a.ci95 is not None
        lo, hi = a.ci95
        if lo >= rule.threshold:
            return Verdict(
                "promote",
                f"{figure}: its lower bound {lo:.3f} reached {rule.threshold:g}",
            )
        if hi < rule.threshold:
            return Verdict(
                "abort",
                f"the candidate disagrees with the serving model: {figure}, upper bound "
                f"{hi:.3f} below {rule.threshold:g}",
            )
        return Verdict(
            "wait", f"{figure}: the interval holds {rule.threshold:g}; scoring more images"
        )

    def end(self, now: float, outcome: str) -> None:
        if self.ended_at is None:
            self.ended_at, self.outcome = now, outcome
            self.announced = False  # the stops are still to be written


def describe_agreement(a: Proportion) -> str:
    if a.value is None or a.ci95 is None:
        return "no image scored yet"
    return f"agreement {a.value:.3f} (95% CI {a.ci95[0]:.3f}-{a.ci95[1]:.3f}, {a.k}/{a.n})"


def shadow_info(phase: ShadowPhase, targets: Sequence[ShadowTarget], now: float) -> ShadowInfo:
    """The API's view of a shadow phase (`rollout status --json`'s `shadow`)."""
    total = phase.totals()
    rule = phase.policy.rule()
    length = phase.policy.shadow_for_s
    labels = sorted({a for a in total.confusion} | {c for r in total.confusion.values() for c in r})
    w = total.latency_weight

    def mean(i: int) -> float | None:
        return round(total.latency_sums[i] / w, 3) if w else None

    a50, a99, c50, c99 = (mean(i) for i in range(4))
    nodes = []
    for t in targets:
        e = phase.nodes.get(t.node_id, NodeEvidence())
        error = (
            UpdateError(code=t.shadow_error_code, message=t.shadow_error_message or "")
            if t.shadow_error_code
            else None
        )
        nodes.append(
            ShadowNodeInfo(
                node_id=t.node_id,
                state=t.shadow_state,
                error=error,
                agreement=e.agreement,
                skipped=e.skipped,
                windows=e.windows,
                last_at=_ts(e.last_at),
            )
        )
    need = rule.n if rule is not None else None
    return ShadowInfo(
        rate=phase.policy.rate,
        promote_when=phase.policy.promote_when,
        threshold=rule.threshold if rule is not None else None,
        n_required=need,
        shadow_for_s=length,
        started_at=_ts(phase.started_at) or datetime.fromtimestamp(now, UTC),
        ends_at=_ts(phase.started_at + length) if length and phase.open else None,
        ended_at=_ts(phase.ended_at),
        outcome=phase.outcome,
        open=phase.open,
        agreement=total.agreement,
        progress=min(1.0, total.n / need) if need else None,
        verdict=phase.verdict().text if phase.open else (phase.outcome or ""),
        labels=labels,
        confusion={a: dict(row) for a, row in sorted(total.confusion.items())},
        mean_abs_dp=round(total.dp_sum / total.n, 6) if total.n else None,
        max_abs_dp=total.dp_max,
        latency=ShadowLatency(
            active_p50=a50,
            active_p99=a99,
            candidate_p50=c50,
            candidate_p99=c99,
            delta_p50=round(c50 - a50, 3) if c50 is not None and a50 is not None else None,
            delta_p99=round(c99 - a99, 3) if c99 is not None and a99 is not None else None,
        ),
        skipped=total.skipped,
        failed=sum(1 for t in targets if t.shadow_state is ShadowState.FAILED),
        nodes=nodes,
        disagreements=[
            NodeDisagreement(node_id=node_id, **d.model_dump())
            for node_id, d in reversed(phase.recent)
        ],
    )


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None
