"""The fleet page's figures as text: numbers, ages, times, sizes, long strings cut
short (the templates' filters, and the view modules' helpers)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

TEXT_MAX = 120


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
