"""Every state machine's states, one enum each (DESIGN.md, Rollout), and how each
state is shown. The hub's database, CLI tables and fleet page derive their lists,
orders, colours and labels from here.

- `UpdateState`: one node's work on one desired model. A node reports it
  (`UpdateReport.state`, any of `NODE_REPORTS`); the hub follows each target of a
  rollout through it, with states of its own: `waiting` (its wave is not issued),
  `timed_out` and `rolled_back`.
- `TargetPhase`: which model a rollout target is sent to: the rollout's, or (after a
  rollback) the one it ran before.
- `RolloutState`: a rollout (`shadowing`: its candidate is scored beside the serving
  model on the target nodes, before any wave).
- `ShadowState`: one node's part in a rollout's shadow phase, as it reports it.
- `DriftState`: a node's live figures against its bundle's reference (node/drift.py).
- `NodeState`: a node. A node says `online` or `offline` of itself (`NodeStatus.state`,
  `NODE_SAYS`); the hub adds `stale`, `conflict` and `unreachable` (hub/fleet.py).
- `Tone`: how a state is shown, the same in the CLI's tables and on the fleet page.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class UpdateState(StrEnum):
    """In display order (the CLI and the page count nodes per state in this order)."""

    WAITING = "waiting"
    """Hub-side: the target's wave has not been issued (yet). No node reports it."""
    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    """Hub-side: not active within node_timeout_s."""
    ROLLED_BACK = "rolled_back"
    """Hub-side: back on the model it ran before (active in the rollback phase)."""


NODE_REPORTS = tuple(s for s in UpdateState if s is not UpdateState.WAITING)
"""The states an UpdateReport may carry (the hub acts on the working ones, `active` and
`failed`)."""
UPDATE_IN_PROGRESS = frozenset(
    {UpdateState.PENDING, UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.ACTIVATING}
)
"""A node at work on its desired model."""
TARGET_FINISHED = frozenset(
    {UpdateState.ACTIVE, UpdateState.FAILED, UpdateState.TIMED_OUT, UpdateState.ROLLED_BACK}
)
"""A rollout target in these states is done (its outcome is kept)."""
TARGET_FAILURES = frozenset({UpdateState.FAILED, UpdateState.TIMED_OUT})
"""The finished states that count against a rollout's max_failures."""


class TargetPhase(StrEnum):
    ROLLOUT = "rollout"
    """Sent to the rollout's model."""
    ROLLBACK = "rollback"
    """Sent back to the model it ran when the rollout began."""


def rolling_back(phase: TargetPhase, state: UpdateState) -> bool:
    """A target on its way back (shown as `rolling back` beside its state)."""
    return phase is TargetPhase.ROLLBACK and state not in TARGET_FINISHED


class RolloutState(StrEnum):
    SHADOWING = "shadowing"
    """The candidate runs beside the serving model on the targets; no wave is issued
    until it is promoted (by its rule or the operator)."""
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


ACTIVE_ROLLOUT_STATES = frozenset(
    {RolloutState.SHADOWING, RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)
"""A rollout in these states holds its nodes: no second rollout may target them."""
FINISHED_ROLLOUT_STATES = frozenset(RolloutState) - ACTIVE_ROLLOUT_STATES
"""A rollout in these states is over (`rollout status --watch` stops)."""


class ShadowState(StrEnum):
    """A node's part in a shadow phase (`ShadowReport.state`)."""

    LOADING = "loading"
    """Fetching, verifying, compiling and self-testing the candidate."""
    SHADOWING = "shadowing"
    """Loaded beside the serving model: scoring a share of the live images."""
    FAILED = "failed"
    """The candidate could not be loaded beside the serving model (error code); the
    serving model is untouched."""
    STOPPED = "stopped"
    """Told to stop: the candidate was unloaded."""


class DriftState(StrEnum):
    """A drift signal's state (and a node's: its worst signal). The rule: node/drift.py."""

    OK = "ok"
    WATCH = "watch"
    ALERT = "alert"
    COLLECTING = "collecting"
    """Fewer live images than `drift.min_images` since the model was loaded."""
    NO_REFERENCE = "no_reference"
    """The bundle carries no drift reference (an older bundle): nothing to compare with."""


DRIFT_SEVERITY: Mapping[DriftState, int] = {
    DriftState.OK: 0,
    DriftState.WATCH: 1,
    DriftState.ALERT: 2,
}
"""The states with a level (what /metrics exports as cellwatch_node_drift)."""


class NodeState(StrEnum):
    """What the hub says of a node (computed when asked, from what it last heard)."""

    ONLINE = "online"
    OFFLINE = "offline"
    STALE = "stale"
    """Its last status said online, but it has been silent for STALE_AFTER_INTERVALS
    telemetry intervals (shared/limits.py)."""
    CONFLICT = "conflict"
    """Two processes claim this node id."""
    UNREACHABLE = "unreachable"
    """Its site's bridge to the central broker is down: what it last said is not known
    to be current, and it is not counted as failed (DESIGN.md, Sites)."""


NODE_SAYS = (NodeState.ONLINE, NodeState.OFFLINE)
"""The states a node's own NodeStatus may carry (its Will says offline)."""


# -- display ----------------------------------------------------------------------------


class Tone(StrEnum):
    """How a state is shown: its colour in the CLI's tables (hub/render.py) and its CSS
    class on the fleet page (hub/web/static/fleet.css). In the order of a wave's bar."""

    GOOD = "good"
    """Where it was sent: green."""
    BUSY = "busy"
    """Under way: blue on the page, plain in the tables."""
    BACK = "back"
    """Back on an earlier model: teal."""
    WARN = "warn"
    """Held, or needs a look: yellow."""
    BAD = "bad"
    """Failed: red."""
    ALARM = "alarm"
    """Two processes claim one node id: red, bold in the tables."""
    OFF = "off"
    """Not in play (yet): grey."""


TONE_GROUPS: tuple[tuple[Tone, tuple[StrEnum, ...]], ...] = (
    (Tone.GOOD, (UpdateState.ACTIVE, RolloutState.COMPLETED, NodeState.ONLINE, DriftState.OK)),
    (
        Tone.BUSY,
        (
            *UPDATE_IN_PROGRESS,
            RolloutState.RUNNING,
            RolloutState.SHADOWING,
            ShadowState.LOADING,
            ShadowState.SHADOWING,
        ),
    ),
    (Tone.BACK, (UpdateState.ROLLED_BACK, RolloutState.ROLLED_BACK)),
    (
        Tone.WARN,
        (
            RolloutState.PAUSED,
            RolloutState.ROLLING_BACK,
            NodeState.STALE,
            NodeState.UNREACHABLE,
            DriftState.WATCH,
        ),
    ),
    (Tone.BAD, (*TARGET_FAILURES, RolloutState.ABORTED, ShadowState.FAILED, DriftState.ALERT)),
    (Tone.ALARM, (NodeState.CONFLICT,)),
    (
        Tone.OFF,
        (
            UpdateState.WAITING,
            NodeState.OFFLINE,
            ShadowState.STOPPED,
            DriftState.COLLECTING,
            DriftState.NO_REFERENCE,
        ),
    ),
)
"""Every state of the enums above under its tone (each state once; a value two enums
share, such as `rolled_back` or `shadowing`, has one tone: tested)."""
TONES: Mapping[str, Tone] = {state.value: tone for tone, states in TONE_GROUPS for state in states}
"""The tone of every state of the enums above, by value (`rolled_back` is a target's and
a rollout's state, with one tone)."""


def tone(state: str) -> Tone:
    return TONES[state]


def label(state: str) -> str:
    """A state as the fleet page writes it (the CLI and --json print the value)."""
    return state.replace("_", " ")
