"""Pydantic models for every message on the wire (DESIGN.md, Messages).

Each model forbids unknown fields and carries a `schema` tag naming its version, so
a reader can tell `cellwatch.result/1` from anything else on a topic.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
)
from pydantic_core import PydanticCustomError

from cellwatch.shared.base import Strict
from cellwatch.shared.codes import ApiErrorCode, ErrorCode, ModelErrorCode, UpdateErrorCode
from cellwatch.shared.drift import DriftFigures
from cellwatch.shared.limits import (
    MAX_ERROR_CODES,
    MAX_TELEMETRY_COUNT,
    MAX_TELEMETRY_INFLIGHT,
    MAX_TELEMETRY_LATENCY_MS,
    MAX_TELEMETRY_RATE,
    MAX_TELEMETRY_RSS_MB,
)
from cellwatch.shared.states import NODE_REPORTS, NODE_SAYS, NodeState, ShadowState, UpdateState
from cellwatch.shared.topics import NAME_PATTERN

Name = Annotated[str, StringConstraints(pattern=rf"^{NAME_PATTERN}$")]
"""A `{source}`, `{node_id}` or user name."""

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ImageId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.+-]{1,64}$")]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _only(*allowed: StrEnum) -> BeforeValidator:
    """Accept only these members of the field's enum: a message that carries some of a
    state machine's states (refused with the words pydantic uses for an enum)."""
    values = [a.value for a in allowed]
    quoted = [repr(v) for v in values]
    expected = " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)

    def check(value: Any) -> Any:
        if value not in values:
            raise PydanticCustomError("enum", "Input should be {expected}", {"expected": expected})
        return value

    return BeforeValidator(check)


class Message(Strict):
    """Base of every wire message: strict about unknown fields, JSON in and out."""

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class ModelRef(Message):
    """A model's identity, the one type for it everywhere: which model produced a
    result, is served, is desired, is revoked. The manifest's hash is the identity;
    name and version are what people read.

    On the wire it is {name, version, manifest_sha256}, except in Results and node
    statuses, which write the hash as `sha256` (DESIGN.md; see `ShortModelRef`).
    Both keys are read."""

    name: ModelName
    version: Version
    manifest_sha256: Sha256 = Field(
        validation_alias=AliasChoices("manifest_sha256", "sha256"),
        description="SHA-256 of the bundle's manifest.json",
    )

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def _short_keys(m: ModelRef) -> dict[str, str]:
    return {"name": m.name, "version": m.version, "sha256": m.manifest_sha256}


ShortModelRef = Annotated[ModelRef, PlainSerializer(_short_keys, return_type=dict[str, str])]
"""A ModelRef written as {name, version, sha256}: the `model` of a Result and of a
NodeStatus (DESIGN.md, Messages)."""


# -- results ---------------------------------------------------------------


class ErrorInfo(Message):
    code: ErrorCode
    message: str


class Timings(Message):
    queue: float = Field(0.0, ge=0, description="ms from receipt to start of decoding")
    decode: float = Field(0.0, ge=0)
    preprocess: float = Field(0.0, ge=0)
    infer: float = Field(0.0, ge=0)
    total: float = Field(0.0, ge=0, description="ms from receipt to the Result")


class Result(Message):
    """A node's answer to one image (`cellwatch.result/1`)."""

    schema_: Literal["cellwatch.result/1"] = Field("cellwatch.result/1", alias="schema")
    status: Literal["ok", "error"]
    image_id: ImageId
    source: Name | None = Field(
        description="the account that sent the image (its images topic names it); null for "
        "a local file"
    )
    scope: Name | None = Field(
        None,
        description="the scope (microscope) the images topic names, if any; left out when "
        "there is none (an additive field: a Result without it reads as before)",
        exclude_if=lambda v: v is None,
    )
    node_id: Name
    model: ShortModelRef | None = None
    label: str | None = None
    class_index: int | None = Field(None, ge=0)
    confidence: Probability | None = None
    probabilities: dict[str, Probability] | None = None
    low_confidence: bool | None = None
    timings_ms: Timings = Field(default_factory=Timings)
    received_at: datetime
    completed_at: datetime
    error: ErrorInfo | None = None
    flags: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="the model's flags: synthetic, untrained, unverified-base, no-skill, "
        "degraded (shared.provenance.MODEL_FLAGS); additive, absent when there is none",
    )

    def to_json(self) -> bytes:
        # Without flags the message is exactly a Result of before the field.
        exclude = None if self.flags else {"flags"}
        return self.model_dump_json(by_alias=True, exclude=exclude).encode()


# -- node status and telemetry ---------------------------------------------


class ModelError(Message):
    code: ModelErrorCode
    message: str = Field(max_length=2048)


class NodeStatus(Message):
    schema_: Literal["cellwatch.status/1"] = Field("cellwatch.status/1", alias="schema")
    node_id: Name
    state: Annotated[NodeState, _only(*NODE_SAYS)]
    boot_id: str = Field(min_length=8, max_length=64)
    since: datetime
    model: ShortModelRef | None = None
    device: str | None = None
    devices_available: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list, description="groups this node belongs to")
    software: dict[str, str] = Field(default_factory=dict)
    model_flags: list[str] = Field(
        default_factory=list,
        description="warnings of the model served: synthetic, untrained, degraded "
        "(shared.manifest.model_flags)",
    )
    model_error: ModelError | None = Field(
        None,
        description="why the node serves an earlier bundle than its active one, or none "
        "(model null): the bundle it should serve failed to load, or was revoked",
    )
    site: Name | None = Field(
        None,
        description="the site (a lab's own broker, bridged to the hub's) the node is at, "
        "or none on a single broker (DESIGN.md, Sites)",
    )

    def to_json(self) -> bytes:
        # Without a model error or a site the message is exactly a status of before the
        # fields (a hub of before them takes it).
        exclude = {k for k in ("model_error", "site") if getattr(self, k) is None}
        return self.model_dump_json(by_alias=True, exclude=exclude or None).encode()


class Latency(Message):
    model_config = ConfigDict(allow_inf_nan=False)

    p50: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)
    p95: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)
    p99: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)


Count = Annotated[int, Field(ge=0, le=MAX_TELEMETRY_COUNT)]
ErrorCodeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class SampleFigures(Message):
    """A node's field samples since start (node/samples.py, issue 20)."""

    kept: dict[ErrorCodeName, Count] = Field(
        default_factory=dict, max_length=8, description="samples spooled, per reason"
    )
    dropped: dict[ErrorCodeName, Count] = Field(
        default_factory=dict,
        max_length=16,
        description="selected images not kept, per cause: limit, queue, quota, disk, "
        "undecodable; and spooled samples lost: corrupt, expired",
    )
    uploaded: Count = Field(0, description="samples the hub acknowledged")
    spooled: Count = Field(0, description="samples waiting on the node's disk now")
    spool_bytes: Count = Field(0, description="their size")


class Telemetry(Message):
    """A node's figures every `window_s`. Absurd values (negative, NaN, infinite, or
    beyond the bounds in shared/limits.py) make the whole message invalid."""

    model_config = ConfigDict(allow_inf_nan=False)

    schema_: Literal["cellwatch.telemetry/1"] = Field("cellwatch.telemetry/1", alias="schema")
    node_id: Name
    ts: datetime
    window_s: float = Field(gt=0, le=3600)
    processed: Count = Field(description="images answered since start")
    errors: Count = Field(description="error Results since start")
    errors_by_code: dict[ErrorCodeName, Count] = Field(
        default_factory=dict,
        max_length=MAX_ERROR_CODES,
        description="error Results since start per error code (they add up to errors)",
    )
    throughput_ips: float = Field(
        ge=0, le=MAX_TELEMETRY_RATE, description="images per second over the window"
    )
    latency_ms: Latency
    inflight: int = Field(ge=0, le=MAX_TELEMETRY_INFLIGHT)
    model_version: str | None = Field(None, max_length=64)
    rss_mb: float = Field(ge=0, le=MAX_TELEMETRY_RSS_MB)
    retained_images: Count = Field(
        0,
        description="retained images the broker replayed to this node since start: "
        "acknowledged without a Result, but stored in the broker until the operator "
        "clears them (additive: left out while 0)",
        exclude_if=lambda v: v == 0,
    )
    drift: DriftFigures | None = Field(
        None,
        description="the live images' figures against the bundle's drift reference "
        "(shared/drift.py); absent from nodes that do not compute them (additive: left "
        "out when none)",
        exclude_if=lambda v: v is None,
    )
    samples: SampleFigures | None = Field(
        None,
        description="field samples (issue 20); absent when the node keeps none (additive)",
        exclude_if=lambda v: v is None,
    )


# -- model rollout ---------------------------------------------------------


class DesiredModel(Message):
    schema_: Literal["cellwatch.desired/1"] = Field("cellwatch.desired/1", alias="schema")
    rollout_id: str = Field(min_length=1, max_length=64)
    model: ModelRef
    issued_at: datetime


class ApiError(Message):
    """Why the hub refused an API call, a fetch request or an HTTP request."""

    code: ApiErrorCode
    message: str


class UpdateError(Message):
    """Why a node's model update failed."""

    code: UpdateErrorCode
    message: str = Field(max_length=2048)


class UpdateReport(Message):
    schema_: Literal["cellwatch.update/1"] = Field("cellwatch.update/1", alias="schema")
    rollout_id: str = Field(min_length=1, max_length=64)
    model: ModelRef
    state: Annotated[UpdateState, _only(*NODE_REPORTS)]
    progress: float = Field(ge=0.0, le=1.0)
    error: UpdateError | None = None
    ts: datetime


# -- shadow phase --------------------------------------------------------------------

MAX_WINDOW_DISAGREEMENTS = 16
"""Disagreeing images a shadow window names at most (the rest are counted)."""
WindowId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]


class ShadowOrder(Message):
    """The hub's shadow order for one node, retained on `nodes/{node_id}/shadow`:
    load `model` beside the serving model and score `rate` of the live images with it;
    `model` null: stop (unload the candidate). A node without shadow support never
    reads it."""

    schema_: Literal["cellwatch.shadow/1"] = Field("cellwatch.shadow/1", alias="schema")
    rollout_id: str = Field(min_length=1, max_length=64)
    model: ModelRef | None = Field(description="the candidate; null: stop shadowing")
    rate: float = Field(ge=0.0, le=1.0, description="share of live images scored (a ceiling)")
    issued_at: datetime


class Disagreement(Message):
    """One live image on which the candidate's label differed from the serving
    model's: its hash and both answers, never its pixels (nor its image_id, which a lab
    may have named after a patient)."""

    image_sha256: Sha256
    source: Name | None = Field(description="the lab account that sent it (null: direct)")
    active_label: str = Field(max_length=64)
    candidate_label: str = Field(max_length=64)
    active: dict[str, Probability] = Field(max_length=64)
    candidate: dict[str, Probability] = Field(max_length=64)


class LatencyPair(Message):
    model_config = ConfigDict(allow_inf_nan=False)

    p50: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)
    p99: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)


class ShadowWindow(Message):
    """What one node saw in one window of its shadow phase. `window_id` is unique per
    node process and window: the hub counts a window once, however often it arrives."""

    model_config = ConfigDict(allow_inf_nan=False)

    window_id: WindowId
    started_at: datetime
    ended_at: datetime
    n: Count = Field(description="images scored by both models")
    agreements: Count = Field(description="of them, with the same label")
    skipped: Count = Field(description="images sampled for shadow work but not scored (busy)")
    confusion: dict[str, dict[str, Count]] = Field(
        default_factory=dict,
        max_length=64,
        description="serving model's label -> candidate's label -> images",
    )
    mean_abs_dp: float | None = Field(None, ge=0, le=1, description="mean max |p difference|")
    max_abs_dp: float | None = Field(None, ge=0, le=1)
    active_ms: LatencyPair | None = Field(None, description="serving model's inference")
    candidate_ms: LatencyPair | None = Field(None, description="the candidate's inference")
    disagreements: list[Disagreement] = Field(
        default_factory=list, max_length=MAX_WINDOW_DISAGREEMENTS
    )
    more_disagreements: Count = Field(0, description="disagreements beyond the list")


class ShadowReport(Message):
    """A node's part in a rollout's shadow phase, on `nodes/{node_id}/shadow-report`:
    its state (loading, shadowing, failed with a code, stopped) and, while shadowing,
    a closed window of scores."""

    schema_: Literal["cellwatch.shadow-report/1"] = Field(
        "cellwatch.shadow-report/1", alias="schema"
    )
    rollout_id: str = Field(min_length=1, max_length=64)
    model: ModelRef = Field(description="the candidate")
    state: ShadowState
    progress: float = Field(0.0, ge=0.0, le=1.0, description="loading: download progress")
    error: UpdateError | None = None
    window: ShadowWindow | None = None
    ts: datetime


class FetchRequest(Message):
    """A node asks the hub for `length` bytes of one bundle file from `offset`.

    Published on `{prefix}/hub/fetch/{node_id}`: the topic, which the broker's ACL
    ties to the node, says who asks (version 2 dropped `node_id` from the body)."""

    schema_: Literal["cellwatch.fetch/2"] = Field("cellwatch.fetch/2", alias="schema")
    manifest_sha256: Sha256
    file: str = Field(min_length=1, max_length=64)
    offset: int = Field(ge=0)
    length: int = Field(gt=0)


MAX_REVOCATIONS = 10_000


REVOCATION_STATEMENT = "cellwatch.revocation/1"
KeyId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class Revocation(ModelRef):
    """One revoked bundle, signed by a release key (shared/revocations.py): a node and
    a hub take it only if a key in their trusted-keys directory signed it, so no hub
    (a restored one, an impostor with the hub's broker password) can forge or drop
    one. The signature covers `signed_bytes()`: every field but the signature."""

    reason: str = Field(max_length=500)
    revoked_at: AwareDatetime
    key_id: KeyId | None = Field(None, description="the release key that signed it")
    signature: str | None = Field(
        None, max_length=128, description="base64 Ed25519 signature of signed_bytes()"
    )

    def signed_bytes(self) -> bytes:
        """The statement the release key signs (canonical JSON)."""
        statement = {
            "schema": REVOCATION_STATEMENT,
            "name": self.name,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "reason": self.reason,
            "revoked_at": self.revoked_at.astimezone(UTC).isoformat(timespec="microseconds"),
        }
        return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


class RevocationList(Message):
    """Every bundle the hub has revoked: retained on `{prefix}/hub/revoked`, which only
    the hub may write (ACL). Each entry is signed by a release key; nodes take the
    signed entries, never drop one they know, and refuse these bundles."""

    schema_: Literal["cellwatch.revoked/1"] = Field("cellwatch.revoked/1", alias="schema")
    revoked: list[Revocation] = Field(default_factory=list, max_length=MAX_REVOCATIONS)
    issued_at: datetime

    def shas(self) -> frozenset[str]:
        return frozenset(r.manifest_sha256 for r in self.revoked)

    def find(self, sha: str) -> Revocation | None:
        return next((r for r in self.revoked if r.manifest_sha256 == sha), None)


class ApiRequest(Message):
    """An operator's call to the hub on `cellwatch/hub/api/{verb}`."""

    schema_: Literal["cellwatch.api/1"] = Field("cellwatch.api/1", alias="schema")
    request_id: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)


class ApiReply(Message):
    schema_: Literal["cellwatch.api-reply/1"] = Field("cellwatch.api-reply/1", alias="schema")
    request_id: str | None
    ok: bool
    data: Any = None
    error: ApiError | None = None
