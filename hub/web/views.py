"""What the pages show, computed from the hub's API models (no HTML here: the
templates render these, with autoescape). Everything is read at request time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import ValidationError

from cellwatch.hub.db import RolloutEvent, TargetRecord
from cellwatch.hub.history import HISTORY_S, Samples
from cellwatch.shared.figures import Auc, BundleMetrics, Proportion
from cellwatch.shared.hubapi import ModelInfo, NodeInfo, RolloutInfo, ShadowInfo, WaveInfo
from cellwatch.shared.promotion import duration_text
from cellwatch.shared.states import NodeState, TargetPhase, Tone, UpdateState, tone

SPARK_POINTS = 60
"""Most points of one sparkline (the hour in up to 60 time bins)."""
SPARK_W, SPARK_H = 120.0, 24.0
DEPLOYED_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "roc_auc")
GENERIC_METRICS_MAX = 16
"""Most leaves of a bundle's metrics shown when they are not in the agreed shape."""
TEXT_MAX = 120

BAR_GROUPS: tuple[tuple[Tone, tuple[UpdateState, ...]], ...] = tuple(
    (t, members) for t in Tone if (members := tuple(s for s in UpdateState if tone(s) is t))
)
"""The segments of a wave's bar: the target states of each tone, in Tone order."""


# -- formatting (also the templates' filters) -----------------------------------------
def num(value: Any, digits: int = 1) -> str:
    """A figure for a table cell: fixed decimals, or 3 significant digits when huge."""
    if value is None:
        return "–"
    v = float(value)
    if not math.isfinite(v):
        return "–"
    if abs(v) >= 1e6:
        return f"{v:.3g}"
    return f"{v:,.{digits}f}"


def ago(value: datetime | float | None, now: float) -> str:
    if value is None:
        return "never"
    ts = value.timestamp() if isinstance(value, datetime) else value
    age = max(0.0, now - ts)
    if age < 120:
        return f"{age:.0f} s ago"
    if age < 7200:
        return f"{age / 60:.0f} min ago"
    if age < 2 * 86400:
        return f"{age / 3600:.0f} h ago"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def clock(value: datetime | float | None) -> str:
    if value is None:
        return "–"
    ts = value.timestamp() if isinstance(value, datetime) else value
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - the loop returns


def short(text: Any, limit: int = TEXT_MAX) -> str:
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# -- sparklines -----------------------------------------------------------------------
@dataclass(frozen=True)
class Spark:
    points: str
    """SVG polyline points in a SPARK_W x SPARK_H box ("" when there is no data)."""
    title: str
    low: float | None
    peak: float | None


def spark(ts: np.ndarray, values: np.ndarray, now: float, what: str, unit: str) -> Spark:
    """The series over [first sample, now], in up to SPARK_POINTS time bins (means)."""
    ok = np.isfinite(values)
    ts, values = ts[ok], values[ok]
    if len(ts) == 0:
        return Spark("", f"{what}: no telemetry in the last hour", None, None)
    t0 = max(float(ts[0]), now - HISTORY_S)
    span = max(now - t0, 1e-9)
    bins = min(SPARK_POINTS, len(ts))
    index = np.clip(((ts - t0) / span * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    sums = np.bincount(index, weights=values, minlength=bins)
    filled = counts > 0
    means = sums[filled] / counts[filled]
    xs = (np.flatnonzero(filled) + 0.5) / bins * SPARK_W if bins > 1 else np.array([SPARK_W])
    peak = float(values.max())
    scale = (SPARK_H - 2) / peak if peak > 0 else 0.0
    ys = SPARK_H - 1 - means * scale
    if len(xs) == 1:  # one point: a short flat line, visible
        xs = np.array([max(xs[0] - 4, 0.0), xs[0]])
        ys = np.array([ys[0], ys[0]])
    points = ("%.1f,%.1f " * len(xs) % tuple(np.column_stack([xs, ys]).ravel())).rstrip()
    minutes = span / 60
    title = (
        f"{what} over the last {minutes:.0f} min ({len(ts)} samples): "
        f"low {num(values.min(), 2)}, high {num(peak, 2)}, last {num(values[-1], 2)} {unit}"
    )
    return Spark(points, title, float(values.min()), peak)


# -- nodes ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftCell:
    """A node's drift badge: its state, what moved, and the label-free estimate."""

    state: str
    label: str
    title: str
    estimate: str | None
    estimate_note: str | None
    supported: bool


def drift_cell(n: NodeInfo) -> DriftCell | None:
    d = n.drift
    if d is None:
        return None
    label = {"no_reference": "no reference", "collecting": f"collecting {d.n}"}.get(
        d.state, d.state
    )
    moved = [
        f"{sig}: PSI {s.psi:.2f}, p {s.p_value:.2g} ({s.state})"
        for sig, s in d.signals.items()
        if s.psi is not None and s.p_value is not None
    ]
    if d.state == "no_reference":
        title = "the bundle carries no drift reference (an older bundle): nothing to compare with"
    elif d.state == "collecting":
        title = f"{d.n} live images so far: a state needs more (the node's drift.min_images)"
    else:
        title = f"last {d.n} images vs {d.reference_n} reference images; " + "; ".join(moved)
    a = d.accuracy
    estimate = None
    if a is not None:
        estimate = f"est. accuracy {a.value:.2f} ({a.ci95[0]:.2f}–{a.ci95[1]:.2f})"
    return DriftCell(
        d.state, label, title, estimate, a.note if a else None, a.supported if a else False
    )


@dataclass(frozen=True)
class NodeRow:
    info: NodeInfo
    state: str
    telemetry: dict[str, Any]
    spark: Spark
    drift: DriftCell | None = None
    shares: str | None = None
    """Predicted-label shares over the last hour."""

    def latency(self, q: str) -> Any:
        lat = self.telemetry.get("latency_ms")
        return lat.get(q) if isinstance(lat, dict) else None


def shares_text(shares: dict[str, float] | None) -> str | None:
    if not shares:
        return None
    return " · ".join(f"{label} {share:.0%}" for label, share in shares.items())


def node_rows(nodes: list[NodeInfo], samples: Mapping[str, Samples], now: float) -> list[NodeRow]:
    rows = []
    for n in nodes:
        s = samples.get(n.node_id)
        sp = (
            spark(s.ts, s.series("throughput_ips"), now, "throughput", "img/s")
            if s is not None
            else Spark("", "throughput: no telemetry in the last hour", None, None)
        )
        rows.append(
            NodeRow(
                n, n.state.value, n.telemetry or {}, sp, drift_cell(n), shares_text(n.shares_1h)
            )
        )
    return rows


def state_counts(nodes: Iterable[NodeInfo]) -> dict[str, int]:
    counts = Counter(n.state.value for n in nodes)
    return {s.value: counts.get(s.value, 0) for s in NodeState}


@dataclass(frozen=True)
class NodeSeries:
    name: str
    unit: str
    spark: Spark


NODE_SERIES = (
    ("throughput_ips", "throughput", "img/s"),
    ("p50_ms", "latency p50", "ms"),
    ("p99_ms", "latency p99", "ms"),
    ("inflight", "in flight", "images"),
    ("rss_mb", "resident memory", "MiB"),
)


def node_series(s: Samples, now: float) -> list[NodeSeries]:
    return [
        NodeSeries(label, unit, spark(s.ts, s.series(key), now, label, unit))
        for key, label, unit in NODE_SERIES
    ]


@dataclass(frozen=True)
class NodeTargetRow:
    rollout_id: str
    model: str
    phase: TargetPhase
    state: UpdateState
    progress: float
    error: str | None
    updated_at: float


def node_targets(targets: list[TargetRecord]) -> list[NodeTargetRow]:
    return [
        NodeTargetRow(
            t.rollout_id,
            str(t.model),
            t.phase,
            t.state,
            t.progress,
            f"{t.error_code}: {t.error_message or ''}" if t.error_code else None,
            t.updated_at,
        )
        for t in targets
    ]


# -- models ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricCell:
    name: str
    value: str
    interval: str | None


@dataclass(frozen=True)
class ModelRow:
    info: ModelInfo
    running: int
    metrics: list[MetricCell]
    n: int | None
    """Sample size of the metrics (None: not in the bundle)."""
    with_intervals: bool
    """metrics are the agreed `metrics.deployed.metrics` (value + ci95)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _typed(metrics: dict[str, Any]) -> tuple[list[MetricCell], int | None] | None:
    """cellwatch-train's metrics (shared.figures.BundleMetrics), read by attribute."""
    try:
        figures = BundleMetrics.model_validate(metrics)
    except ValidationError:
        return None
    deployed = figures.deployed.metrics
    cells = []
    for name in DEPLOYED_METRICS:
        figure: Proportion | Auc = getattr(deployed, name)
        interval = None
        if figure.ci95 is not None:
            interval = f"95% CI {figure.ci95[0]:.3f}–{figure.ci95[1]:.3f}"
        value = "–" if figure.value is None else f"{figure.value:.3f}"
        cells.append(MetricCell(name, value, interval))
    return cells, figures.n


def _deployed(metrics: dict[str, Any]) -> tuple[list[MetricCell], int | None] | None:
    """The agreed `deployed.metrics` in a partial or older shape (other tools)."""
    deployed = metrics.get("deployed")
    if not isinstance(deployed, dict) or not isinstance(deployed.get("metrics"), dict):
        return None
    values: dict[str, Any] = deployed["metrics"]
    names = [m for m in DEPLOYED_METRICS if m in values] + sorted(
        k for k in values if k not in DEPLOYED_METRICS and isinstance(values[k], dict)
    )
    cells = []
    for name in names[:GENERIC_METRICS_MAX]:
        entry = values[name]
        if not isinstance(entry, dict):
            continue
        value = _number(entry.get("value"))
        ci = entry.get("ci95")
        interval = None
        if isinstance(ci, list | tuple) and len(ci) == 2:
            lo, hi = _number(ci[0]), _number(ci[1])
            if lo is not None and hi is not None:
                interval = f"95% CI {lo:.3f}–{hi:.3f}"
        cells.append(
            MetricCell(short(name, 32), f"{value:.3f}" if value is not None else "–", interval)
        )
    n = next(
        (
            int(c)
            for c in (deployed.get("n"), values.get("n"), metrics.get("n"))
            if isinstance(c, int) and not isinstance(c, bool)
        ),
        None,
    )
    return cells, n


def _leaves(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], value


def _generic(metrics: dict[str, Any]) -> tuple[list[MetricCell], int | None]:
    """The numbers among a bundle's metrics in another shape (e.g. today's
    `{"evaluation": {...}}`), and its sample size if a leaf is called n."""
    cells: list[MetricCell] = []
    n = None
    for name, value in _leaves(metrics):
        number = _number(value)
        if number is None:
            continue  # labels, fingerprints, confusion matrices: see --json
        if name.rsplit(".", 1)[-1] == "n" and isinstance(value, int):
            n = value
            continue
        if len(cells) == GENERIC_METRICS_MAX:
            cells.append(MetricCell("…", "more in `cellwatch-hub models --json`", None))
            break
        cells.append(MetricCell(short(name, 48), f"{number:.3f}", None))
    return cells, n


def model_rows(models: list[ModelInfo], nodes: list[NodeInfo]) -> list[ModelRow]:
    running = Counter(
        n.model.manifest_sha256 for n in nodes if n.model and n.state != NodeState.OFFLINE
    )
    rows = []
    for m in models:
        deployed = _typed(m.metrics) or _deployed(m.metrics)
        if deployed is not None:
            cells, n = deployed
            rows.append(ModelRow(m, running.get(m.manifest_sha256, 0), cells, n, True))
        else:
            cells, n = _generic(m.metrics)
            rows.append(ModelRow(m, running.get(m.manifest_sha256, 0), cells, n, False))
    return rows


# -- rollouts -------------------------------------------------------------------------
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
