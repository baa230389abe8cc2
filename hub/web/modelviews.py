"""What the fleet page shows of the models: a row per bundle with the fleet nodes
running it and its metrics (the agreed `deployed.metrics` with intervals, or the
numbers of another shape). Computed from the hub's API models at request time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from cellwatch.hub.web.filters import short
from cellwatch.shared.figures import Auc, BundleMetrics, Proportion
from cellwatch.shared.hubapi import ModelInfo, NodeInfo
from cellwatch.shared.states import NodeState

DEPLOYED_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "roc_auc")
GENERIC_METRICS_MAX = 16
"""Most leaves of a bundle's metrics shown when they are not in the agreed shape."""


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
