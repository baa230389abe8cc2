"""Arguments and replies of the hub API (`cellwatch/hub/api/{verb}`), one model each.

A request is an `ApiRequest` whose `args` validate against the verb's argument
model; a reply is an `ApiReply` whose `data` is the verb's reply model (as JSON).
The bundle upload between `push.begin` and `push.commit` is raw bytes on
`cellwatch/hub/api/upload` (see `UPLOAD_VERB` and `UploadAck`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from cellwatch.shared.base import Strict
from cellwatch.shared.drift import DriftFigures
from cellwatch.shared.figures import Proportion
from cellwatch.shared.promotion import (
    MAX_SHADOW_S,
    PromoteRule,
    ShadowSpecError,
    parse_promote_when,
    parse_rate,
)
from cellwatch.shared.samples import SampleReason, SampleRow
from cellwatch.shared.schemas import (
    Disagreement,
    ModelError,
    ModelName,
    ModelRef,
    Name,
    Revocation,
    Sha256,
    ShortModelRef,
    UpdateError,
    Version,
)
from cellwatch.shared.states import NodeState, RolloutState, ShadowState, TargetPhase, UpdateState
from cellwatch.shared.waves import DEFAULT_WAVES, parse_threshold, parse_waves

UPLOAD_VERB = "upload"
"""Raw chunk upload: a chunk of the one chunk format (shared.rpc.transfer: the bytes,
user properties offset, sha256 and total) with user properties upload_id and file."""


class NoArgs(Strict):
    pass


# -- models and push ----------------------------------------------------------------


class PushBeginArgs(Strict):
    manifest: str = Field(description="manifest.json, base64")
    signature: str | None = Field(None, description="manifest.sig, base64 (None: unsigned)")


class UploadFile(Strict):
    size: int = Field(ge=0, description="size the manifest gives")
    offset: int = Field(ge=0, description="bytes the hub already has (upload from here)")


class ModelInfo(ModelRef):
    size: int = Field(ge=0, description="bytes of all files, manifest and signature included")
    precision: str
    signer: str | None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(description="the manifest's created_at")
    pushed_at: datetime
    synthetic: bool = Field(False, description="trained on SYNTHETIC data (provenance)")
    untrained: bool = Field(False, description="trained from random weights, no checkpoint")
    unverified_base: bool = Field(
        False, description="base checkpoint's hash is not the published file's (--base-is)"
    )
    no_skill: bool = Field(
        False, description="no evidence of skill on the test split (--allow-no-skill)"
    )
    degraded: bool = Field(False, description="exported although it failed the export gate")
    revoked_at: datetime | None = Field(
        None, description="when `models revoke` revoked it (never rolled out again)"
    )
    revoke_reason: str | None = None


class PushBeginReply(Strict):
    status: Literal["already_present", "upload"]
    model: ModelInfo | None = None
    upload_id: Sha256 | None = None
    files: dict[str, UploadFile] = Field(default_factory=dict)
    chunk_bytes: int = Field(0, ge=0, description="largest upload chunk the hub accepts")


class UploadAck(Strict):
    file: str
    offset: int = Field(ge=0, description="the next offset the hub expects for this file")
    complete: bool


class PushCommitArgs(Strict):
    upload_id: Sha256


class PushCommitReply(Strict):
    status: Literal["stored", "already_present"]
    model: ModelInfo


class ModelsArgs(Strict):
    name: ModelName | None = None


class ModelsReply(Strict):
    models: list[ModelInfo]


class RevokeArgs(Strict):
    revocation: Revocation = Field(
        description="the revocation, signed by a release key the hub and nodes trust"
    )


class RevokeReply(Strict):
    model: ModelInfo
    nodes: list[Name] = Field(
        description="nodes the hub last saw serving it: they move to their previous "
        "good bundle, or answer no_model without one"
    )
    aborted: list[str] = Field(description="active rollouts of it, now aborted")
    moved: list[Name] = Field(
        default_factory=list,
        description="nodes whose retained desired model named it: told to go back to the "
        "model they ran before it (the rollouts that switched them roll back)",
    )


# -- fleet ---------------------------------------------------------------------------


class NodeInfo(Strict):
    node_id: Name
    state: NodeState
    boot_id: str | None
    since: datetime | None
    last_seen: datetime | None
    tags: list[str]
    model: ShortModelRef | None
    device: str | None
    telemetry: dict[str, Any] | None
    bytes_served: int = Field(0, ge=0, description="bundle bytes sent to it (all time)")
    model_error: ModelError | None = Field(
        None, description="why it serves an earlier bundle than it should, or none"
    )
    drift: DriftFigures | None = Field(
        None, description="its live figures against its bundle's reference (last telemetry)"
    )
    shares_1h: dict[str, float] | None = Field(
        None, description="predicted-label shares over the last hour (None: no images)"
    )
    site: Name | None = Field(None, description="its site (NodeStatus.site), or none")


class SiteInfo(Strict):
    """A site as the hub knows it: its bridge's link, from the site's notification topic."""

    site: Name
    link_up: bool | None = Field(
        description="whether its bridge is connected to the central broker (None: the hub "
        "has not heard of its bridge, only of nodes that name it)"
    )
    since: datetime | None = Field(description="when the hub heard the link's state change")
    nodes: int = Field(ge=0, description="nodes whose status names this site")


class NodesReply(Strict):
    nodes: list[NodeInfo]
    sites: list[SiteInfo] = Field(default_factory=list)


class StatsReply(Strict):
    started_at: datetime
    fetch_requests: int
    fetch_errors: int
    bytes_served: int
    bytes_by_node: dict[str, int]
    bytes_by_bundle: dict[str, int]
    bytes_by_node_bundle: dict[str, dict[str, int]]


# -- rollouts -------------------------------------------------------------------------

Waves = Annotated[
    str,
    Field(max_length=256, description="cumulative waves: counts or percentages of the targets"),
]
AdvanceAt = Annotated[
    float, Field(gt=0.0, le=1.0, description="share of a wave that must be active to go on")
]
MaxFailures = Annotated[
    str,
    Field(
        max_length=16,
        description="abort when failed + timed_out exceed this count or percentage",
    ),
]
MinExecuted = Annotated[
    int,
    Field(ge=1, le=100_000, description="finished nodes needed before the abort rule applies"),
]
NodeTimeout = Annotated[
    float, Field(gt=0, le=7 * 24 * 3600, description="seconds a node has to reach active")
]


class RolloutPolicy(Strict):
    """How a rollout proceeds (DESIGN.md, Rollout; the wave and threshold grammar is
    shared/waves.py). The hub's `[rollout]` settings are the defaults, `rollout start`
    may override each field, and a rollout keeps the policy it began with."""

    waves: Waves = DEFAULT_WAVES
    advance_at: AdvanceAt = 1.0
    max_failures: MaxFailures = "0"
    min_executed: MinExecuted = 1
    node_timeout_s: NodeTimeout = 900.0

    @field_validator("waves")
    @classmethod
    def _waves(cls, value: str) -> str:
        parse_waves(value)
        return value

    @field_validator("max_failures")
    @classmethod
    def _threshold(cls, value: str) -> str:
        parse_threshold(value)
        return value


class ShadowPolicy(Strict):
    """A rollout's shadow phase (shared/promotion.py has the grammar of each field)."""

    rate: float = Field(gt=0.0, le=1.0, description="share of live images scored (a ceiling)")
    promote_when: str | None = Field(
        None, max_length=100, description="agreement>=X[,n>=N] (None: only the operator promotes)"
    )
    shadow_for_s: float | None = Field(
        None, gt=0, le=MAX_SHADOW_S, description="then pause for the operator (None: no limit)"
    )

    @field_validator("promote_when")
    @classmethod
    def _rule(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_promote_when(value))

    def rule(self) -> PromoteRule | None:
        return None if self.promote_when is None else parse_promote_when(self.promote_when)


class RolloutStartArgs(Strict):
    name: ModelName
    version: Version
    target: str = Field(
        "all", min_length=1, max_length=4096, description="all | group:G | node:ID,ID"
    )
    waves: Waves | None = Field(None, description="e.g. 1,25%,100% (None: the hub's default)")
    advance_at: AdvanceAt | None = None
    max_failures: MaxFailures | None = Field(None, description="count or percentage")
    min_executed: MinExecuted | None = None
    node_timeout_s: NodeTimeout | None = None
    yes_untrained: bool = Field(
        False,
        description="confirm rolling out a model with any flag: synthetic, untrained, "
        "unverified-base, no-skill, degraded (refused with error code untrained_model otherwise)",
    )
    shadow: str | None = Field(
        None, max_length=16, description="start with a shadow phase scoring this share (20%)"
    )
    promote_when: str | None = Field(
        None, max_length=100, description="agreement>=X[,n>=N]: promote on evidence"
    )
    shadow_for_s: float | None = Field(None, gt=0, le=MAX_SHADOW_S)

    def shadow_policy(self) -> ShadowPolicy | None:
        """The shadow phase asked for (None: none); ShadowSpecError if malformed, or if
        a promotion rule or duration comes without --shadow."""
        if self.shadow is None:
            if self.promote_when is not None or self.shadow_for_s is not None:
                raise ShadowSpecError(
                    "--promote-when and --shadow-for need a shadow phase: add --shadow RATE"
                )
            return None
        if self.promote_when is not None:
            parse_promote_when(self.promote_when)  # the reason, not pydantic's words
        return ShadowPolicy(
            rate=parse_rate(self.shadow),
            promote_when=self.promote_when,
            shadow_for_s=self.shadow_for_s,
        )

    def policy(self, defaults: RolloutPolicy) -> RolloutPolicy:
        """The defaults with the fields this request sets (None, or an empty text: the
        default); WaveSpecError if its waves or max_failures do not parse."""
        given = {
            name: value
            for name in RolloutPolicy.model_fields
            if (value := getattr(self, name)) not in (None, "")
        }
        policy = defaults.model_copy(update=given)  # bounds: checked by the same types
        parse_waves(policy.waves)
        parse_threshold(policy.max_failures)
        return policy


class RolloutIdArgs(Strict):
    rollout_id: str = Field(min_length=1, max_length=64)


class RolloutStatusArgs(Strict):
    rollout_id: str | None = Field(None, min_length=1, max_length=64)


class TargetInfo(Strict):
    node_id: Name
    wave: int = Field(ge=0, description="0-based wave index")
    phase: TargetPhase
    state: UpdateState
    progress: float
    error: UpdateError | None
    previous: ModelRef | None = Field(description="the model it ran when the rollout began")
    issued_at: datetime | None
    finished_at: datetime | None


class WaveInfo(Strict):
    index: int
    size: int = Field(description="nodes this wave adds")
    issued: bool
    counts: dict[UpdateState, int] = Field(description="nodes of this wave per state")


class ShadowNodeInfo(Strict):
    node_id: Name
    state: ShadowState | None = Field(description="as it last reported (None: not yet)")
    error: UpdateError | None
    agreement: Proportion
    skipped: int
    windows: int
    last_at: datetime | None


class ShadowLatency(Strict):
    """Inference latency in ms: per window p50 / p99, averaged over windows (weighted
    by their images); delta = candidate - serving model."""

    active_p50: float | None
    active_p99: float | None
    candidate_p50: float | None
    candidate_p99: float | None
    delta_p50: float | None
    delta_p99: float | None


class NodeDisagreement(Disagreement):
    node_id: Name


class ShadowInfo(Strict):
    """A rollout's shadow phase: its settings, the evidence pooled over its targets
    (agreement with a Wilson 95% interval), and per node."""

    rate: float
    promote_when: str | None
    threshold: float | None
    n_required: int | None
    shadow_for_s: float | None
    started_at: datetime
    ends_at: datetime | None = Field(description="when it pauses for the operator (None: never)")
    ended_at: datetime | None
    outcome: str | None = Field(description="how the phase ended (promoted, aborted, ...)")
    open: bool = Field(description="the phase goes on: nodes score the candidate")
    agreement: Proportion
    progress: float | None = Field(description="n / n_required (None: no rule)")
    verdict: str = Field(description="what the rule makes of the evidence now")
    labels: list[str]
    confusion: dict[str, dict[str, int]] = Field(
        description="serving model's label -> candidate's label -> images"
    )
    mean_abs_dp: float | None
    max_abs_dp: float | None
    latency: ShadowLatency
    skipped: int
    failed: int = Field(description="targets that could not load the candidate")
    nodes: list[ShadowNodeInfo]
    disagreements: list[NodeDisagreement] = Field(description="the latest few")


class RolloutInfo(Strict):
    rollout_id: str
    model: ModelRef
    target: str
    state: RolloutState
    reason: str | None
    policy: RolloutPolicy
    wave: int = Field(description="index of the last issued wave (-1: none yet)")
    waves: list[WaveInfo]
    counts: dict[UpdateState, int]
    targets: list[TargetInfo]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    existing: bool = Field(False, description="start: an identical rollout was already running")
    model_flags: list[str] = Field(
        default_factory=list, description="the model's flags (shared.provenance.MODEL_FLAGS)"
    )
    shadow: ShadowInfo | None = Field(None, description="its shadow phase (None: it had none)")


class RolloutList(Strict):
    rollouts: list[RolloutInfo]


# -- field samples (issue 20; hub/samples.py) ---------------------------------------
MAX_LABELS_PER_CALL = 500
"""Labels per `samples.label` call (an API request is at most 64 KiB)."""
SAMPLE_IMAGE_CHUNK_BYTES = 192 * 1024
"""Bytes of a sample image per `samples.image` answer (base64 in the reply)."""


class SamplesArgs(Strict):
    reason: SampleReason | None = None
    source: Name | None = None


class SampleCount(Strict):
    reason: SampleReason
    source: Name
    samples: int = Field(ge=0)
    labelled: int = Field(ge=0)


class SamplesReply(Strict):
    samples: list[SampleRow]
    labels: list[str] = Field(description="the class names a label must be one of")
    counts: list[SampleCount] = Field(description="per reason and source (all samples)")


class SampleImageArgs(Strict):
    id: Sha256
    offset: int = Field(0, ge=0)


class SampleImageReply(Strict):
    id: Sha256
    offset: int = Field(ge=0)
    total: int = Field(ge=0)
    data: str = Field(description="base64 of the bytes from offset")


class SampleLabelArgs(Strict):
    labels: dict[Sha256, str] = Field(max_length=MAX_LABELS_PER_CALL)


class SampleLabelReply(Strict):
    labelled: int = Field(ge=0)
