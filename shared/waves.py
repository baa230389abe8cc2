"""Wave and threshold arithmetic for rollouts (DESIGN.md, Rollout).

A wave list such as `1,25%,100%` names cumulative shares of the target list: `1`
is one node (the canary), `25%` the first quarter (rounded up), `100%` everyone.
Waves that add no node are dropped, and a last wave covering every target is added
when the list stops short, so no target is left out.

A threshold (`max_failures`) is a count (`2`) or a percentage of the targets (`10%`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DEFAULT_WAVES = "1,25%,100%"
"""The canary, a quarter, everyone."""
MAX_WAVES = 20
_COUNT_RE = re.compile(r"^\d{1,6}$")
_PERCENT_RE = re.compile(r"^\d{1,3}(\.\d{1,3})?%$")


class WaveSpecError(ValueError):
    """A wave list or threshold is not valid (message says why)."""


@dataclass(frozen=True)
class Share:
    """A count of nodes, or a percentage of the targets."""

    value: float
    percent: bool

    def of(self, total: int) -> float:
        return total * self.value / 100.0 if self.percent else self.value

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


def parse_share(text: str, *, allow_zero: bool) -> Share:
    item = text.strip()
    if _COUNT_RE.match(item):
        share = Share(float(int(item)), percent=False)
    elif _PERCENT_RE.match(item):
        share = Share(float(item[:-1]), percent=True)
        if share.value > 100:
            raise WaveSpecError(f"{item!r}: a percentage must be at most 100%")
    else:
        raise WaveSpecError(f"{item!r} is neither a node count (e.g. 1) nor a percentage (25%)")
    if share.value == 0 and not allow_zero:
        raise WaveSpecError(f"{item!r}: a wave must add at least one node")
    return share


def parse_waves(spec: str) -> list[Share]:
    """`1,25%,100%` -> shares; WaveSpecError if malformed."""
    items = [i for i in spec.split(",") if i.strip()]
    if not items:
        raise WaveSpecError("waves: give at least one wave, e.g. 1,25%,100%")
    if len(items) > MAX_WAVES:
        raise WaveSpecError(f"waves: at most {MAX_WAVES} waves")
    return [parse_share(i, allow_zero=False) for i in items]


def parse_threshold(spec: str) -> Share:
    """`max_failures`: `0`, `2` or `10%`."""
    return parse_share(spec, allow_zero=True)


def plan_waves(total: int, shares: list[Share]) -> list[int]:
    """Cumulative node counts per wave for `total` targets (last one == total)."""
    if total <= 0:
        return []
    counts: list[int] = []
    for share in shares:
        n = min(total, max(1, math.ceil(share.of(total) - 1e-9)))
        if not counts or n > counts[-1]:
            counts.append(n)
    if counts[-1] < total:
        counts.append(total)
    return counts


def wave_of(position: int, counts: list[int]) -> int:
    """Index of the wave that issues the target at `position` (0-based)."""
    for index, count in enumerate(counts):
        if position < count:
            return index
    raise ValueError(f"position {position} is beyond the last wave ({counts})")
