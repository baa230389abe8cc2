"""Pydantic models for every message on the wire (DESIGN.md, Messages).

Each model forbids unknown fields and carries a `schema` tag naming its version, so
a reader can tell `cellwatch.result/1` from anything else on a topic.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cellwatch.shared.limits import (
    MAX_ERROR_CODES,
    MAX_TELEMETRY_COUNT,
    MAX_TELEMETRY_INFLIGHT,
    MAX_TELEMETRY_LATENCY_MS,
    MAX_TELEMETRY_RATE,
    MAX_TELEMETRY_RSS_MB,
)
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


class Message(BaseModel):
    """Base of every wire message: strict about unknown fields, JSON in and out."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class ModelRef(Message):
    """Which model produced a result or is being served."""

    name: ModelName
    version: Version
    sha256: Sha256 = Field(description="SHA-256 of the bundle's manifest.json")


# -- results ---------------------------------------------------------------


class ErrorCode(StrEnum):
    UNDECODABLE_IMAGE = "undecodable_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    IMAGE_TOO_LARGE = "image_too_large"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    EXPIRED = "expired"
    NO_MODEL = "no_model"
    INVALID_REQUEST = "invalid_request"
    DEVICE_ERROR = "device_error"
    """The inference device failed or did not finish in time; sending again may work."""
    POISON_IMAGE = "poison_image"
    """The image was being processed during two crashes of this node: refused."""
    INTERNAL = "internal"


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
    source: Name | None = Field(description="{source} of the images topic; null if direct")
    node_id: Name
    model: ModelRef | None = None
    label: str | None = None
    class_index: int | None = Field(None, ge=0)
    confidence: Probability | None = None
    probabilities: dict[str, Probability] | None = None
    low_confidence: bool | None = None
    timings_ms: Timings = Field(default_factory=Timings)
    received_at: datetime
    completed_at: datetime
    error: ErrorInfo | None = None


# -- node status and telemetry ---------------------------------------------


class NodeStatus(Message):
    schema_: Literal["cellwatch.status/1"] = Field("cellwatch.status/1", alias="schema")
    node_id: Name
    state: Literal["online", "offline"]
    boot_id: str = Field(min_length=8, max_length=64)
    since: datetime
    model: ModelRef | None = None
    device: str | None = None
    devices_available: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list, description="groups this node belongs to")
    software: dict[str, str] = Field(default_factory=dict)
    model_flags: list[str] = Field(
        default_factory=list,
        description="warnings of the model served: synthetic, untrained, degraded "
        "(shared.manifest.model_flags)",
    )


class Latency(Message):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    p50: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)
    p95: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)
    p99: float = Field(ge=0, le=MAX_TELEMETRY_LATENCY_MS)


Count = Annotated[int, Field(ge=0, le=MAX_TELEMETRY_COUNT)]
ErrorCodeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class Telemetry(Message):
    """A node's figures every `window_s`. Absurd values (negative, NaN, infinite, or
    beyond the bounds in shared/limits.py) make the whole message invalid."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

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


# -- model rollout ---------------------------------------------------------


class DesiredModelRef(Message):
    name: ModelName
    version: Version
    manifest_sha256: Sha256


class DesiredModel(Message):
    schema_: Literal["cellwatch.desired/1"] = Field("cellwatch.desired/1", alias="schema")
    rollout_id: str = Field(min_length=1, max_length=64)
    model: DesiredModelRef
    issued_at: datetime


class UpdateState(StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"


class ApiError(Message):
    code: str = Field(description="e.g. bad_request, unknown_verb, not_found, conflict")
    message: str


class UpdateReport(Message):
    schema_: Literal["cellwatch.update/1"] = Field("cellwatch.update/1", alias="schema")
    rollout_id: str = Field(min_length=1, max_length=64)
    model: DesiredModelRef
    state: UpdateState
    progress: float = Field(ge=0.0, le=1.0)
    error: ApiError | None = Field(
        None,
        description="code: bad_signature, hash_mismatch, fetch_failed, compile_error, "
        "self_test_failed, disk_full, internal",
    )
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
