"""What the fleet page shows of the nodes: their rows (state, telemetry, sparkline,
drift badge, label shares), the state counts, a node's series and its rollout targets.
Computed from the hub's API models at request time; the templates render them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellwatch.hub.history import HISTORY_S, Samples
from cellwatch.hub.records import TargetRecord
from cellwatch.hub.web.filters import num
from cellwatch.shared.hubapi import NodeInfo
from cellwatch.shared.states import NodeState, TargetPhase, UpdateState

SPARK_POINTS = 60
"""Most points of one sparkline (the hour in up to 60 time bins)."""
SPARK_W, SPARK_H = 120.0, 24.0


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
