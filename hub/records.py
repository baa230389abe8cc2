"""The rows of the hub's database as values (hub/db.py reads and writes them): a node, a
model, a rollout's event and a rollout target as the node's page shows it, and the
functions that turn a row into one and back."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.schemas import ModelRef
from cellwatch.shared.states import (
    NodeState,
    TargetPhase,
    UpdateState,
)


@dataclass
class NodeRecord:
    node_id: str
    state: NodeState = NodeState.OFFLINE
    """What its last status said (online, offline); hub/fleet.py tells stale and conflict."""
    boot_id: str | None = None
    since: float | None = None
    last_seen: float | None = None
    tags: list[str] = field(default_factory=list)
    model: ModelRef | None = None
    model_at: float = 0.0
    device: str | None = None
    telemetry: dict[str, Any] | None = None
    conflict_at: float | None = None
    """Last time an older process said it was online after a newer one (fleet.py)."""
    model_error: dict[str, str] | None = None
    """The node's NodeStatus.model_error ({code, message}) as last heard."""
    boots: list[str] = field(default_factory=list)
    """The node's earlier boot ids, in the order the hub first heard of them (oldest
    first): what makes a status `stale` (fleet.py), never the node's own clock."""


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: str
    manifest_sha256: str
    size: int
    precision: str
    signer: str | None
    metrics: dict[str, Any]
    created_at: str
    pushed_at: float
    provenance: dict[str, Any] = field(default_factory=dict)
    revoked_at: float | None = None
    revoke_reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, manifest_sha256=self.manifest_sha256)


@dataclass(frozen=True)
class RolloutEvent:
    ts: float
    text: str


@dataclass(frozen=True)
class TargetRecord:
    """One node's part in one rollout (the per-node page's history)."""

    rollout_id: str
    model: ModelRef
    phase: TargetPhase
    state: UpdateState
    progress: float
    error_code: UpdateErrorCode | None
    error_message: str | None
    updated_at: float


def ref_of(name: str, version: str, sha256: str) -> ModelRef:
    return ModelRef(name=name, version=version, manifest_sha256=sha256)


def code_of(value: str | None) -> UpdateErrorCode | None:
    return UpdateErrorCode(value) if value else None


def model_of(r: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        name=r["name"],
        version=r["version"],
        manifest_sha256=r["manifest_sha256"],
        size=r["size"],
        precision=r["precision"],
        signer=r["signer"],
        metrics=json.loads(r["metrics"]),
        created_at=r["created_at"],
        pushed_at=r["pushed_at"],
        provenance=json.loads(r["provenance"]),
        revoked_at=r["revoked_at"],
        revoke_reason=r["revoke_reason"],
    )


def node_of(r: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        node_id=r["node_id"],
        state=NodeState(r["state"]),
        boot_id=r["boot_id"],
        since=r["since"],
        last_seen=r["last_seen"],
        tags=json.loads(r["tags"]),
        model=ref_of(r["model_name"], r["model_version"], r["model_sha256"])
        if r["model_sha256"]
        else None,
        model_at=r["model_at"],
        device=r["device"],
        telemetry=json.loads(r["telemetry"]) if r["telemetry"] else None,
        conflict_at=r["conflict_at"],
        model_error=json.loads(r["model_error"]) if r["model_error"] else None,
        boots=json.loads(r["boots"]),
    )


def node_row(n: NodeRecord) -> tuple[Any, ...]:
    m = n.model
    return (
        n.node_id,
        n.state.value,
        n.boot_id,
        n.since,
        n.last_seen,
        json.dumps(n.tags),
        m.name if m else None,
        m.version if m else None,
        m.manifest_sha256 if m else None,
        n.model_at,
        n.device,
        json.dumps(n.telemetry) if n.telemetry is not None else None,
        n.conflict_at,
        json.dumps(n.model_error) if n.model_error is not None else None,
        json.dumps(n.boots),
    )
