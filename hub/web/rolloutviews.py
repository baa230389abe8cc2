"""What the fleet page shows of the rollouts: a row per rollout with its waves' bars,
its failures, its shadow phase's card, and its event log. Computed from the hub's API
models at request time; the templates render them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cellwatch.hub.records import RolloutEvent
from cellwatch.shared.hubapi import RolloutInfo, ShadowInfo, WaveInfo
from cellwatch.shared.promotion import duration_text
from cellwatch.shared.states import Tone, UpdateState, tone

BAR_GROUPS: tuple[tuple[Tone, tuple[UpdateState, ...]], ...] = tuple(
    (t, members) for t in Tone if (members := tuple(s for s in UpdateState if tone(s) is t))
)
"""The segments of a wave's bar: the target states of each tone, in Tone order."""


@dataclass(frozen=True)
class Segment:
    kind: Tone
    x: float
    width: float
    count: int


@dataclass(frozen=True)
class WaveBar:
    index: int
    size: int
    issued: bool
    segments: list[Segment]
    label: str


def wave_bar(w: WaveInfo) -> WaveBar:
    total = max(sum(w.counts.values()), 1)
    segments, x = [], 0.0
    for kind, states in BAR_GROUPS:
        count = sum(w.counts.get(s, 0) for s in states)
        if count:
            width = count / total * 100.0
            segments.append(Segment(kind, x, width, count))
            x += width
    parts = [f"{w.counts[s]} {s}" for s in UpdateState if w.counts.get(s)]
    return WaveBar(w.index, w.size, w.issued, segments, ", ".join(parts) or "no nodes")


@dataclass(frozen=True)
class ShadowCard:
    """A rollout's shadow phase on the page: the agreement with its interval drawn on an
    axis from `lo` to 1 (x in percent of the bar), the threshold, the confusion, the
    latency delta, the progress toward n."""

    info: ShadowInfo
    lo: float
    point: float | None
    band: tuple[float, float] | None
    threshold: float | None
    agreement: str
    progress: float | None
    progress_text: str
    rows: list[tuple[str, list[int]]]
    latency: str | None
    dp: str | None
    settings: str


def _axis_lo(info: ShadowInfo) -> float:
    """The left end of the agreement axis: 0.8, or lower so the interval and threshold
    fit, in steps of 0.1."""
    low = min(
        [0.8]
        + ([info.agreement.ci95[0]] if info.agreement.ci95 else [])
        + ([info.threshold] if info.threshold is not None else [])
    )
    return max(0.0, math.floor(low * 10 - 1e-9) / 10)


def shadow_card(info: ShadowInfo) -> ShadowCard:
    lo = _axis_lo(info)

    def x(v: float) -> float:
        return round((v - lo) / (1.0 - lo) * 100.0, 2) if lo < 1.0 else 100.0

    a = info.agreement
    if a.value is None or a.ci95 is None:
        text, point, band = "no image scored yet", None, None
    else:
        text = f"{a.value:.3f} (95% CI {a.ci95[0]:.3f}–{a.ci95[1]:.3f}, {a.k}/{a.n})"
        point, band = x(a.value), (x(a.ci95[0]), x(a.ci95[1]))
    need = info.n_required
    progress_text = f"{a.n} of {need} images" if need else f"{a.n} images (no n required)"
    lat = info.latency
    latency = None
    if lat.delta_p50 is not None and lat.delta_p99 is not None:
        latency = (
            f"candidate {lat.candidate_p50:.1f} / {lat.candidate_p99:.1f} ms vs serving "
            f"{lat.active_p50:.1f} / {lat.active_p99:.1f} ms p50 / p99 "
            f"(Δ {lat.delta_p50:+.1f} / {lat.delta_p99:+.1f} ms)"
        )
    dp = None
    if info.mean_abs_dp is not None:
        dp = f"|Δp| mean {info.mean_abs_dp:.3f}, max {info.max_abs_dp or 0.0:.3f}"
    rule = f"promote when {info.promote_when}" if info.promote_when else "operator promotes"
    length = f", for up to {duration_text(info.shadow_for_s)}" if info.shadow_for_s else ""
    return ShadowCard(
        info=info,
        lo=lo,
        point=point,
        band=band,
        threshold=x(info.threshold) if info.threshold is not None else None,
        agreement=text,
        progress=info.progress,
        progress_text=progress_text,
        rows=[(r, [info.confusion.get(r, {}).get(c, 0) for c in info.labels]) for r in info.labels],
        latency=latency,
        dp=dp,
        settings=f"{info.rate:.0%} of live images, {rule}{length}",
    )


@dataclass(frozen=True)
class RolloutRow:
    info: RolloutInfo
    waves: list[WaveBar]
    total: int
    active: int
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    """(node_id, code, message) of failed or timed-out targets."""
    shadow: ShadowCard | None = None


def rollout_row(r: RolloutInfo) -> RolloutRow:
    failures = [(t.node_id, str(t.error.code), t.error.message) for t in r.targets if t.error]
    failures += [
        (t.node_id, "timed_out", f"not active within {r.policy.node_timeout_s:g} s")
        for t in r.targets
        if t.state is UpdateState.TIMED_OUT and t.error is None
    ]
    if r.shadow is not None:
        failures += [
            (n.node_id, f"shadow {n.error.code}", n.error.message)
            for n in r.shadow.nodes
            if n.error
        ]
    return RolloutRow(
        r,
        [wave_bar(w) for w in r.waves],
        len(r.targets),
        r.counts.get(UpdateState.ACTIVE, 0),
        failures,
        shadow_card(r.shadow) if r.shadow is not None else None,
    )


@dataclass(frozen=True)
class EventRow:
    ts: float
    text: str


def event_rows(events: list[RolloutEvent]) -> list[EventRow]:
    return [EventRow(e.ts, e.text) for e in events]
