"""The node's settings (`node.toml` + `CELLWATCH_*` environment variables).

Example (every field has a default but node_id):

    node_id = "node-1"
    [mqtt]
    host = "localhost"
    port = 1883
    password_file = "/etc/cellwatch/node-1.password"
    [model]
    bundle = "/var/lib/cellwatch/bundles/current"
    trusted_keys = "/etc/cellwatch/trusted-keys"
    [inference]
    device = "CPU"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cellwatch.node.engine import EngineConfig
from cellwatch.shared.limits import (
    DEFAULT_TELEMETRY_INTERVAL_S,
    FETCH_CHUNK_BYTES,
    MAX_DECODED_BYTES,
    MAX_FETCH_CHUNK_BYTES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
)
from cellwatch.shared.schemas import Name
from cellwatch.shared.settings import CellwatchSettings, MqttSettings, Section

NODE_SESSION_EXPIRY_S = 60
"""How long the broker keeps a node's session (and its share of images) while the node
is down. Long enough for a restart under systemd: RestartSec 5 s plus start to online,
measured 1.8 s median / 2.4 s max for Inception V3 int8 on a 2-core CPU
(bench/node_startup.py), so back within 7.4 s; a GPU or NPU compiling without its
cache takes tens of seconds. Short enough that a dead node stops taking its share of
the shared subscription within a minute; the lab client's retry answers what it
held, within about this plus retry_after_s (bench/chaos.py, the README)."""


class NodeMqttSettings(MqttSettings):
    """The node's [mqtt] section: as everywhere, but with a short session expiry."""

    session_expiry_s: int = Field(
        NODE_SESSION_EXPIRY_S,
        ge=0,
        le=2**32 - 1,
        description="how long the broker keeps this node's session (and queued images) "
        "while it is down",
    )


class ModelSettings(Section):
    bundle: Path | None = Field(
        None, description="bundle directory to serve at start (none: answer no_model)"
    )
    trusted_keys: Path | None = Field(
        None, description="directory of *.pub Ed25519 keys whose bundles are accepted"
    )
    allow_unsigned: bool = Field(
        False, description="DEVELOPMENT ONLY: accept bundles without a trusted signature"
    )
    self_test: bool = Field(True, description="run the bundle's golden vectors before serving")


class UpdateSettings(Section):
    store_dir: Path | None = Field(
        None, description="bundle store for hub-driven updates; unset: no updates"
    )
    fetch_window: int = Field(4, ge=1, le=64, description="chunk requests in flight")
    chunk_bytes: int = Field(
        FETCH_CHUNK_BYTES, ge=4096, le=MAX_FETCH_CHUNK_BYTES, description="bytes per request"
    )
    chunk_timeout_s: float = Field(10.0, gt=0, le=600, description="re-ask after this long")
    stall_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="fail the download (fetch_failed) after no chunk this long"
    )
    keep_versions: int = Field(3, ge=2, le=20, description="activated bundles kept on disk")

    @model_validator(mode="after")
    def _stall_after_retry(self) -> UpdateSettings:
        if self.stall_timeout_s < self.chunk_timeout_s:
            raise ValueError("stall_timeout_s must be >= chunk_timeout_s")
        return self


class InferenceSettings(Section):
    device: str = Field(
        "CPU", min_length=1, description="OpenVINO device: CPU, GPU, NPU, AUTO, MYRIAD (legacy)"
    )
    performance_hint: Literal["throughput", "latency"] = Field(
        "throughput", description="throughput: keep the device busy; latency: one image fastest"
    )
    force_f32: bool = Field(False, description="force f32 inference precision (parity checks)")
    infer_requests: int = Field(
        0, ge=0, le=64, description="parallel infer requests; 0 = OpenVINO's optimal number"
    )
    cache_dir: Path | None = Field(None, description="OpenVINO compiled-model cache")
    timeout_s: float = Field(
        30.0, gt=0, le=3600, description="an inference not done by then is a device_error"
    )
    max_device_errors: int = Field(
        3, ge=1, le=1000, description="consecutive device errors before the model is recompiled"
    )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            device=self.device,
            performance_hint=self.performance_hint,
            force_f32=self.force_f32,
            infer_requests=self.infer_requests,
            cache_dir=str(self.cache_dir) if self.cache_dir else None,
            infer_timeout_s=self.timeout_s,
        )


class LimitSettings(Section):
    max_image_bytes: int = Field(
        MAX_IMAGE_BYTES, ge=1024, le=256 * 1024 * 1024, description="largest image payload"
    )
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, le=500_000_000, description="largest image, from its header"
    )
    max_decoded_bytes: int = Field(
        MAX_DECODED_BYTES,
        ge=1024,
        le=16 * 1024**3,
        description="largest decoded image (width x height x channels x bytes per sample)",
    )
    receive_maximum: int = Field(
        16, ge=1, le=65535, description="MQTT Receive Maximum: unacked images the broker sends"
    )
    max_inflight: int = Field(
        64, ge=1, le=4096, description="images accepted but not yet answered (internal bound)"
    )
    decode_workers: int = Field(2, ge=1, le=32, description="threads decoding images")

    @model_validator(mode="after")
    def _bound(self) -> LimitSettings:
        if self.max_inflight < self.receive_maximum:
            raise ValueError("max_inflight must be >= receive_maximum")
        return self


class ShadowSettings(Section):
    """A rollout's shadow phase on this node (node/shadow.py)."""

    window_s: float = Field(
        10.0, gt=0, le=3600, description="a shadow window closes and goes to the hub this often"
    )
    max_live: int = Field(
        0,
        ge=0,
        le=4096,
        description="score a sampled image with the candidate only while at most this many "
        "live images wait for their Result; otherwise skip it (counted)",
    )
    threads: int = Field(
        1, ge=0, le=256, description="CPU threads the candidate's inference uses (0: all)"
    )
    min_free_mb: int = Field(
        256,
        ge=0,
        le=16_777_216,
        description="memory that must stay free with the candidate loaded; otherwise the "
        "node refuses it (insufficient_memory)",
    )


class DriftSettings(Section):
    """The live images' figures against the bundle's reference (node/drift.py)."""

    enabled: bool = Field(True, description="keep the figures and send them in telemetry")
    window: int = Field(500, ge=10, le=100_000, description="live images in the rolling window")
    min_images: int = Field(
        100, ge=1, le=100_000, description="live images before a drift state is given"
    )

    @model_validator(mode="after")
    def _within(self) -> DriftSettings:
        if self.min_images > self.window:
            raise ValueError("min_images must be <= window")
        return self


class ReasonLimits(Section):
    """Samples kept per reason in a rolling window (0: none for that reason)."""

    low_confidence: int = Field(0, ge=0, le=1_000_000)
    disagreement: int = Field(0, ge=0, le=1_000_000)
    random: int = Field(0, ge=0, le=1_000_000)


class SamplesSettings(Section):
    """Field samples for labelling (node/samples.py, issue 20): OFF by default, and only
    ever of the consenting `sources`."""

    enabled: bool = Field(False, description="keep field samples at all")
    sources: list[Name] = Field(
        default_factory=list,
        description="the accounts (a Result's source) that consented to collection; an "
        "image of any other source is never kept",
    )
    random_share: float = Field(
        0.0, ge=0.0, le=1.0, description="share of a consenting source's images kept as random"
    )
    low_confidence: bool = Field(
        True, description="keep images the bundle's low-confidence band holds"
    )
    disagreement: bool = Field(True, description="keep images the shadow candidate disagreed on")
    per_hour: ReasonLimits = Field(
        default_factory=lambda: ReasonLimits(low_confidence=20, disagreement=20, random=20),
        description="samples per reason in any hour",
    )
    per_day: ReasonLimits = Field(
        default_factory=lambda: ReasonLimits(low_confidence=200, disagreement=200, random=200),
        description="samples per reason in any 24 hours",
    )
    quota_mb: float = Field(
        256.0, gt=0, le=1_048_576, description="the spool's size at most; beyond, dropped"
    )
    retention_days: float = Field(
        14.0, gt=0, le=3650, description="a sample not uploaded by then is deleted"
    )
    spool_dir: Path | None = Field(None, description="the spool; default {state_dir}/samples")
    queue: int = Field(
        8, ge=1, le=1024, description="selected images waiting to be written; beyond, dropped"
    )
    upload_bytes_per_s: int = Field(
        262_144, ge=1024, le=1_073_741_824, description="upload bandwidth to the hub at most"
    )
    chunk_bytes: int = Field(
        FETCH_CHUNK_BYTES, ge=1024, le=MAX_FETCH_CHUNK_BYTES, description="bytes per chunk"
    )
    retry_s: float = Field(
        30.0, gt=0, le=3600, description="after a failed upload, try again this much later"
    )
    chunk_timeout_s: float = Field(
        30.0, gt=0, le=600, description="a chunk without an answer by then fails the upload"
    )

    def resolved_spool(self, state_dir: Path) -> Path:
        return self.spool_dir if self.spool_dir is not None else state_dir / "samples"


class NodeSettings(CellwatchSettings):
    node_id: Name = Field(description="this node's id; also its MQTT user name")
    tags: list[Name] = Field(default_factory=list, description="groups for targeted rollouts")
    site: Name | None = Field(
        None,
        description="the site this node is at, when its broker is a site broker bridged to "
        "the hub's (DESIGN.md, Sites): the hub then shows it unreachable, not failed, "
        "while the site's link is down",
    )
    mqtt: NodeMqttSettings = Field(default_factory=NodeMqttSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    updates: UpdateSettings = Field(default_factory=UpdateSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    samples: SamplesSettings = Field(default_factory=SamplesSettings)
    telemetry_interval_s: float = Field(
        DEFAULT_TELEMETRY_INTERVAL_S, gt=0, le=3600, description="telemetry period"
    )
    state_dir: Path | None = Field(
        None,
        description="the journal of images in progress (poison images); default "
        "$STATE_DIRECTORY (systemd) or ~/.local/state/cellwatch/{node_id}",
    )
    shutdown_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a stop finishes within this (below TimeoutStopSec)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _username_is_node_id(self) -> NodeSettings:
        if self.mqtt.username is None:
            self.mqtt = self.mqtt.model_copy(update={"username": self.node_id})
        return self

    @property
    def client_id(self) -> str:
        """`cellwatch-node-{node_id}-{secret}` (MqttSettings.session_client_id): no
        other account can take over the node's session; a second process with the same
        credentials gets the same id, which the duplicate-id detection relies on."""
        return self.mqtt.session_client_id(f"cellwatch-node-{self.node_id}")

    def resolved_state_dir(self) -> Path:
        """state_dir, or systemd's $STATE_DIRECTORY, or the user's XDG state directory."""
        if self.state_dir is not None:
            return self.state_dir
        systemd = os.environ.get("STATE_DIRECTORY")
        if systemd:
            return Path(systemd.split(":")[0])
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(xdg) / "cellwatch" / self.node_id
