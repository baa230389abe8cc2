"""Every state machine's states, one enum each (DESIGN.md, Rollout). The hub's
database, CLI tables and web page derive their lists and orders from these.

- `UpdateState`: a node's progress on one desired model (`UpdateReport.state`).
- `TargetState`: one node's part in a rollout, as the hub sees it: `waiting` for
  its wave, then the node's update states.
- `RolloutState`: a rollout.
- `NodeState`: a node, as the hub sees it.
"""

from __future__ import annotations

from enum import StrEnum


class UpdateState(StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"


class TargetState(StrEnum):
    """In display order (the CLI and the page count nodes per state in this order)."""

    WAITING = "waiting"
    """Its wave has not been issued (yet)."""
    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"


TARGET_FINISHED = frozenset(
    {TargetState.ACTIVE, TargetState.FAILED, TargetState.TIMED_OUT, TargetState.ROLLED_BACK}
)
TARGET_FAILURES = frozenset({TargetState.FAILED, TargetState.TIMED_OUT})


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


ACTIVE_ROLLOUT_STATES = frozenset(
    {RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)
"""A rollout in these states holds its nodes: no second rollout may target them."""


class NodeState(StrEnum):
    """What the hub says of a node (computed when asked, from what it last heard)."""

    ONLINE = "online"
    OFFLINE = "offline"
    STALE = "stale"
    """Its last status said online, but it has been silent for STALE_AFTER_INTERVALS
    telemetry intervals (shared/limits.py)."""
    CONFLICT = "conflict"
    """Two processes claim this node id."""
