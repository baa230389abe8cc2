"""The shadow phase's settings as an operator writes them (`rollout start --shadow RATE
--promote-when RULE --shadow-for DURATION`), parsed in one place.

- RATE: the share of live images a target node scores with the candidate, `20%` or
  `0.2` (more than 0, at most 100%). A ceiling: a busy node skips shadow work.
- RULE: `agreement>=X[,n>=N]`: promote when the lower bound of the agreement's Wilson
  95% interval reaches X (0 < X <= 1, or a percentage) with at least N images scored;
  the candidate aborts itself once its upper bound is below X with N images scored.
- DURATION: how long the phase may last before it pauses for the operator: `90s`,
  `30m`, `2h`, `1d`, or seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SHADOW_S = 90 * 24 * 3600.0
"""The longest shadow phase: 90 days."""
_RATE_RE = re.compile(r"^(\d{1,3}(\.\d{1,4})?)%$|^(0?\.\d{1,6}|1(\.0+)?|0)$")
_DURATION_RE = re.compile(r"^(\d+(\.\d+)?)\s*(s|m|h|d)?$")
_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_CONDITION_RE = re.compile(r"^\s*(agreement|n)\s*>=\s*([0-9.]+%?)\s*$")


class ShadowSpecError(ValueError):
    """A shadow rate, promotion rule or duration is not valid (message says why)."""


@dataclass(frozen=True)
class PromoteRule:
    threshold: float
    """The agreement the interval's lower bound must reach (0 < threshold <= 1)."""
    n: int = 0
    """Images scored at least before the rule decides."""

    def __str__(self) -> str:
        return f"agreement>={self.threshold:g}" + (f",n>={self.n}" if self.n else "")


def parse_rate(text: str) -> float:
    """`20%` or `0.2` -> 0.2; ShadowSpecError unless 0 < rate <= 1."""
    item = text.strip()
    m = _RATE_RE.match(item)
    if m is None:
        raise ShadowSpecError(
            f"shadow rate {item!r}: give a percentage (20%) or a fraction (0.2) of the images"
        )
    rate = float(m.group(1)) / 100.0 if m.group(1) is not None else float(item)
    if not 0.0 < rate <= 1.0:
        raise ShadowSpecError(f"shadow rate {item!r}: must be more than 0 and at most 100%")
    return rate


def _fraction(text: str, what: str) -> float:
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise ShadowSpecError(f"{what}: {text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise ShadowSpecError(f"{what}: {text!r} must be more than 0 and at most 1 (100%)")
    return value


def parse_promote_when(text: str) -> PromoteRule:
    """`agreement>=0.97,n>=300` -> PromoteRule(0.97, 300)."""
    threshold: float | None = None
    n = 0
    for part in (p for p in text.split(",") if p.strip()):
        m = _CONDITION_RE.match(part)
        if m is None:
            raise ShadowSpecError(
                f"promote-when {part.strip()!r}: use agreement>=X and optionally n>=N, "
                "e.g. agreement>=0.97,n>=300"
            )
        name, value = m.group(1), m.group(2)
        if name == "agreement":
            threshold = _fraction(value, "promote-when agreement")
        else:
            if not value.isdigit() or not 0 < int(value) <= 10_000_000:
                raise ShadowSpecError(f"promote-when n: {value!r} must be a count from 1")
            n = int(value)
    if threshold is None:
        raise ShadowSpecError(
            f"promote-when {text.strip()!r}: needs agreement>=X (e.g. agreement>=0.97,n>=300)"
        )
    return PromoteRule(threshold, n)


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `2h`, `1d` or plain seconds -> seconds (more than 0, at most 90 days)."""
    m = _DURATION_RE.match(text.strip().lower())
    if m is None:
        raise ShadowSpecError(f"duration {text.strip()!r}: use e.g. 90s, 30m, 2h or 1d")
    seconds = float(m.group(1)) * _UNITS[m.group(3)]
    if not 0 < seconds <= MAX_SHADOW_S:
        raise ShadowSpecError(f"duration {text.strip()!r}: must be more than 0 and at most 90d")
    return seconds


def duration_text(seconds: float) -> str:
    """A duration as an operator writes it (2h, 30m, 90s)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
