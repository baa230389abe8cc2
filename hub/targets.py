"""What the rollout engine (hub/rollout.py) knows and asks per node: the fleet's view of
a node (`NodeView`, its input), a target's place in a rollout (`Target`, stored per row
by hub/db.py), and the retained messages the engine asks the hub to write (`Desired`,
`ShadowWrite`). Plain records, no rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.schemas import ModelRef
from cellwatch.shared.states import TARGET_FINISHED, ShadowState, TargetPhase, UpdateState


@dataclass(frozen=True)
class NodeView:
    """What the fleet tracker knows about a node."""

    online: bool
    """Online and reachable (a node whose site's link is down is not online here)."""
    model: ModelRef | None
    model_at: float = 0.0
    """When the hub last learnt the node's model (status or report), epoch seconds."""
    reachable: bool = True
    """False while the link of the node's site is down (hub/sites.py)."""


@dataclass(frozen=True)
class Desired:
    """Write this node's retained desired model."""

    node_id: str
    rollout_id: str
    model: ModelRef
    issued_at: float
    """When the target's current phase was issued: written again (after a hub restart,
    or to a node that reconnected), the desired model is the same message, which a
    node already working on it ignores."""


@dataclass(frozen=True)
class ShadowWrite:
    """Write this node's retained shadow order: load `model` beside the serving model
    and score `rate` of its images, or (model None) stop."""

    node_id: str
    rollout_id: str
    model: ModelRef | None
    rate: float
    issued_at: float


@dataclass
class Target:
    node_id: str
    wave: int
    previous: ModelRef | None
    phase: TargetPhase = TargetPhase.ROLLOUT
    state: UpdateState = UpdateState.WAITING
    progress: float = 0.0
    error_code: UpdateErrorCode | None = None
    error_message: str | None = None
    issued_at: float | None = None
    clock_from: float | None = None
    """When the target's timeout clock started (wall time, stored)."""
    deadline: float | None = field(default=None, compare=False)
    """Monotonic time the target times out at (not stored: recomputed from clock_from)."""
    finished_at: float | None = None
    updated_at: float = 0.0
    confirmed: bool = False
    """The broker acknowledged the retained desired written for the current phase."""
    shadow_state: ShadowState | None = None
    """Its part in the shadow phase, as it last reported (None: not heard yet)."""
    shadow_error_code: UpdateErrorCode | None = None
    shadow_error_message: str | None = None
    dirty: bool = field(default=True, compare=False)
    """Changed since the database last stored it (set by every assignment below)."""

    def __setattr__(self, name: str, value: object) -> None:
        # The database writes only the targets that changed: a report of one node of a
        # 2,000-node rollout stores one row, not 2,000.
        object.__setattr__(self, name, value)
        if name not in ("dirty", "deadline"):
            object.__setattr__(self, "dirty", True)

    @property
    def finished(self) -> bool:
        return self.state in TARGET_FINISHED

    @property
    def issued(self) -> bool:
        return self.issued_at is not None
