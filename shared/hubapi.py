"""Arguments and replies of the hub API (`cellwatch/hub/api/{verb}`), one model each.

A request is an `ApiRequest` whose `args` validate against the verb's argument
model; a reply is an `ApiReply` whose `data` is the verb's reply model (as JSON).
The bundle upload between `push.begin` and `push.commit` is raw bytes on
`cellwatch/hub/api/upload` (see `UPLOAD_VERB` and `UploadAck`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellwatch.shared.schemas import ApiError, ModelName, ModelRef, Name, Sha256, Version

UPLOAD_VERB = "upload"
"""Raw chunk upload: payload = bytes; user properties upload_id, file, offset, sha256."""

ROLLOUT_STATES = ("running", "paused", "completed", "aborted", "rolling_back", "rolled_back")
ACTIVE_ROLLOUT_STATES = ("running", "paused", "rolling_back")


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(ApiModel):
    pass


# -- models and push ----------------------------------------------------------------


class PushBeginArgs(ApiModel):
    manifest: str = Field(description="manifest.json, base64")
    signature: str | None = Field(None, description="manifest.sig, base64 (None: unsigned)")


class UploadFile(ApiModel):
    size: int = Field(ge=0, description="size the manifest gives")
    offset: int = Field(ge=0, description="bytes the hub already has (upload from here)")


class ModelInfo(ApiModel):
    name: ModelName
    version: Version
    manifest_sha256: Sha256
    size: int = Field(ge=0, description="bytes of all files, manifest and signature included")
    precision: str
    signer: str | None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(description="the manifest's created_at")
    pushed_at: datetime
    synthetic: bool = Field(False, description="trained on SYNTHETIC data (provenance)")
    untrained: bool = Field(False, description="trained from random weights, no checkpoint")
    degraded: bool = Field(False, description="exported although it failed the export gate")


class PushBeginReply(ApiModel):
    status: Literal["already_present", "upload"]
    model: ModelInfo | None = None
    upload_id: Sha256 | None = None
    files: dict[str, UploadFile] = Field(default_factory=dict)
    chunk_bytes: int = Field(0, ge=0, description="largest upload chunk the hub accepts")


class UploadAck(ApiModel):
    file: str
    offset: int = Field(ge=0, description="the next offset the hub expects for this file")
    complete: bool


class PushCommitArgs(ApiModel):
    upload_id: Sha256


class PushCommitReply(ApiModel):
    status: Literal["stored", "already_present"]
    model: ModelInfo


class ModelsArgs(ApiModel):
    name: ModelName | None = None


class ModelsReply(ApiModel):
    models: list[ModelInfo]


# -- fleet ---------------------------------------------------------------------------


class NodeState(StrEnum):
    """What the hub says of a node (computed when asked, from what it last heard)."""

    ONLINE = "online"
    OFFLINE = "offline"
    STALE = "stale"
    """Its last status said online, but it has been silent for STALE_AFTER_INTERVALS
    telemetry intervals (shared/limits.py)."""
    CONFLICT = "conflict"
    """Two processes claim this node id."""


class NodeInfo(ApiModel):
    node_id: Name
    state: NodeState
    boot_id: str | None
    since: datetime | None
    last_seen: datetime | None
    tags: list[str]
    model: ModelRef | None
    device: str | None
    telemetry: dict[str, Any] | None
    bytes_served: int = Field(0, ge=0, description="bundle bytes sent to it since hub start")


class NodesReply(ApiModel):
    nodes: list[NodeInfo]


class StatsReply(ApiModel):
    started_at: datetime
    fetch_requests: int
    fetch_errors: int
    bytes_served: int
    bytes_by_node: dict[str, int]
    bytes_by_bundle: dict[str, int]
    bytes_by_node_bundle: dict[str, dict[str, int]]


# -- rollouts -------------------------------------------------------------------------


class RolloutStartArgs(ApiModel):
    name: ModelName
    version: Version
    target: str = Field(
        "all", min_length=1, max_length=4096, description="all | group:G | node:ID,ID"
    )
    waves: str | None = Field(None, max_length=256, description="e.g. 1,25%,100%")
    advance_at: float | None = Field(None, gt=0.0, le=1.0)
    max_failures: str | None = Field(None, max_length=16, description="count or percentage")
    min_executed: int | None = Field(None, ge=1, le=100_000)
    node_timeout_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)
    yes_untrained: bool = Field(
        False,
        description="confirm rolling out a model flagged untrained or synthetic "
        "(refused with error code untrained_model otherwise)",
    )


class RolloutIdArgs(ApiModel):
    rollout_id: str = Field(min_length=1, max_length=64)


class RolloutStatusArgs(ApiModel):
    rollout_id: str | None = Field(None, min_length=1, max_length=64)


class DesiredRef(ApiModel):
    name: ModelName
    version: Version
    manifest_sha256: Sha256


class Policy(ApiModel):
    waves: str
    advance_at: float
    max_failures: str
    min_executed: int
    node_timeout_s: float


class TargetInfo(ApiModel):
    node_id: Name
    wave: int = Field(ge=0, description="0-based wave index")
    phase: Literal["rollout", "rollback"]
    state: str
    progress: float
    error: ApiError | None
    previous: DesiredRef | None = Field(description="the model it ran when the rollout began")
    issued_at: datetime | None
    finished_at: datetime | None


class WaveInfo(ApiModel):
    index: int
    size: int = Field(description="nodes this wave adds")
    issued: bool
    counts: dict[str, int] = Field(description="nodes of this wave per state")


class RolloutInfo(ApiModel):
    rollout_id: str
    model: DesiredRef
    target: str
    state: Literal["running", "paused", "completed", "aborted", "rolling_back", "rolled_back"]
    reason: str | None
    policy: Policy
    wave: int = Field(description="index of the last issued wave (-1: none yet)")
    waves: list[WaveInfo]
    counts: dict[str, int]
    targets: list[TargetInfo]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    existing: bool = Field(False, description="start: an identical rollout was already running")
    model_flags: list[str] = Field(
        default_factory=list, description="the model's warnings: synthetic, untrained, degraded"
    )


class RolloutList(ApiModel):
    rollouts: list[RolloutInfo]
