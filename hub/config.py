"""The hub's settings (`hub.toml` + `CELLWATCH_*` environment variables).

Example (every field has a default):

    data_dir = "/var/lib/cellwatch-hub"        # hub.db (SQLite, WAL) and the bundle store
    trusted_keys = "/etc/cellwatch/trusted-keys"
    [mqtt]
    host = "localhost"
    port = 1883
    username = "hub"
    password_file = "/etc/cellwatch/hub.password"
    [rollout]
    waves = "1,25%,100%"
    max_failures = "0"
    node_timeout_s = 900
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cellwatch.hub.waves import parse_threshold, parse_waves
from cellwatch.shared.limits import FETCH_CHUNK_BYTES, MAX_FETCH_CHUNK_BYTES
from cellwatch.shared.settings import CellwatchSettings, MqttSettings, Section

DEFAULT_WAVES = "1,25%,100%"


class RolloutDefaults(Section):
    """What `rollout start` uses for each option the operator leaves out."""

    waves: str = Field(
        DEFAULT_WAVES, description="cumulative waves: counts or percentages of the targets"
    )
    advance_at: float = Field(
        1.0, gt=0.0, le=1.0, description="share of a wave that must be active to go on"
    )
    max_failures: str = Field(
        "0", description="abort when failed + timed_out exceed this count or percentage"
    )
    min_executed: int = Field(
        1, ge=1, le=100_000, description="finished nodes needed before the abort rule applies"
    )
    node_timeout_s: float = Field(
        900.0, gt=0, le=7 * 24 * 3600, description="seconds a node has to reach active"
    )

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


class HubSettings(CellwatchSettings):
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    data_dir: Path = Field(
        Path("hub-data"), description="SQLite database (hub.db) and the bundle store"
    )
    trusted_keys: Path | None = Field(
        None, description="directory of *.pub Ed25519 keys whose bundles are accepted"
    )
    allow_unsigned: bool = Field(
        False, description="DEVELOPMENT ONLY: accept bundles without a trusted signature"
    )
    max_chunk_bytes: int = Field(
        FETCH_CHUNK_BYTES,
        ge=1024,
        le=MAX_FETCH_CHUNK_BYTES,
        description="largest chunk the hub sends per fetch request (longer requests clamped)",
    )
    fetch_workers: int = Field(2, ge=1, le=32, description="threads serving bundle chunks")
    rollout: RolloutDefaults = Field(default_factory=RolloutDefaults)
    tick_s: float = Field(
        1.0, gt=0, le=60, description="period of the rollout engine (timeouts, next waves)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _username_is_hub(self) -> HubSettings:
        if self.mqtt.username is None:
            self.mqtt = self.mqtt.model_copy(update={"username": "hub"})
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or "cellwatch-hub"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hub.db"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"


class OperatorSettings(CellwatchSettings):
    """The `cellwatch-hub` operator commands' connection (an [mqtt] section like the
    hub's, in a file given with --config, plus CELLWATCH_MQTT__* variables)."""

    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    timeout_s: float = Field(10.0, gt=0, le=600, description="how long to wait for the hub")

    @model_validator(mode="after")
    def _username_is_operator(self) -> OperatorSettings:
        if self.mqtt.username is None:
            self.mqtt = self.mqtt.model_copy(update={"username": "operator"})
        return self
