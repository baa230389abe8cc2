"""Settings: a TOML file plus `CELLWATCH_*` environment variables (pydantic-settings).

Precedence: keyword arguments > environment (`CELLWATCH_MQTT__HOST=...`, nested
fields joined by `__`) > the TOML file > defaults. Validation does no I/O; a bad
setting becomes a ConfigError that names the field and the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cellwatch.shared.base import problem
from cellwatch.shared.errors import ConfigError
from cellwatch.shared.topics import DEFAULT_PREFIX

ENV_PREFIX = "CELLWATCH_"
CLIENT_ID_SECRET_HEX = 32
"""Hex digits (128 bits) of the secret part of a derived client id."""
CLIENT_ID_SHOWN_HEX = 4
"""Of those, how many a log line shows (enough to tell two clients apart)."""
_SECRET_TAIL = re.compile(rf"^(.*-)([0-9a-f]{{{CLIENT_ID_SECRET_HEX}}})$")
_toml_path: ContextVar[Path | None] = ContextVar("cellwatch_toml_path", default=None)


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TlsSettings(Section):
    enabled: bool = Field(False, description="connect with TLS (use the broker's TLS port)")
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's")
    cert_file: Path | None = Field(None, description="client certificate (optional)")
    key_file: Path | None = Field(None, description="client private key (optional)")
    check_hostname: bool = Field(True, description="verify the broker's name against its cert")


class MqttSettings(Section):
    host: str = Field("localhost", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 for TLS)")
    username: str | None = Field(None, description="MQTT user name (a node uses its node_id)")
    password: SecretStr | None = Field(None, description="MQTT password")
    password_file: Path | None = Field(None, description="read the password from this file")
    client_id: str | None = Field(
        None,
        description="MQTT client id, used as is (default: derived, with a part only this "
        "account can compute: see session_client_id)",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive")
    session_expiry_s: int = Field(
        3600, ge=0, le=2**32 - 1, description="how long the broker keeps our session offline"
    )
    connect_timeout_s: float = Field(10.0, gt=0, le=300, description="first connection")
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="first reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="reconnect backoff cap")
    topic_prefix: str = Field(DEFAULT_PREFIX, min_length=1, description="topic prefix")

    @model_validator(mode="after")
    def _one_password(self) -> MqttSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    def resolved_password(self) -> str | None:
        """The password, reading password_file if that is how it was given."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"mqtt.password_file: cannot read {self.password_file}: {exc}"
                ) from exc
        return None

    def session_client_id(self, base: str) -> str:
        """The client id a service (hub, node) logs in with: `client_id` if set, else
        `{base}-{secret}`, where secret is the first 32 hex digits of an HMAC-SHA256 of
        the user name and base keyed with the account's password.

        Mosquitto 2.0 lets any account log in with any client id and so take over the
        session of whoever holds it (DESIGN.md, Trust; deploy/PRODUCTION.md, threat
        model). A client id only the password's holder can compute cannot be taken over
        by another account, while two processes with the same credentials still share
        it, so the node's duplicate-id detection works as before. Without a password
        (a development broker) it is plain `base`. Reads password_file if that is how
        the password is given (ConfigError if it cannot)."""
        if self.client_id is not None:
            return self.client_id
        password = self.resolved_password()
        if not password:
            return base
        message = f"cellwatch client id\0{self.username or ''}\0{base}".encode()
        secret = hmac.new(password.encode(), message, hashlib.sha256).hexdigest()
        return f"{base}-{secret[:CLIENT_ID_SECRET_HEX]}"


def client_log_name(client_id: str) -> str:
    """client_id as log lines show it: a secret part (session_client_id's, or the 128
    random bits of a lab client's or operator command's id) cut to its first
    CLIENT_ID_SHOWN_HEX digits, `cellwatch-hub-3f2a...`. Whoever reads a log (or the
    broker's) could otherwise take the session over by logging in with the id."""
    m = _SECRET_TAIL.match(client_id)
    return f"{m[1]}{m[2][:CLIENT_ID_SHOWN_HEX]}..." if m else client_id


class CellwatchSettings(BaseSettings):
    """Base for the node's and the hub's settings; load with `.load(path)`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Self:
        """Settings from path (TOML), the environment and overrides; ConfigError if bad."""
        if path is not None:
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        token = _toml_path.set(path)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, path)) from exc
        finally:
            _toml_path.reset(token)


def describe_validation_error(exc: ValidationError, path: Path | None = None) -> str:
    """One line per problem: `field.path: reason`."""
    where = f"{path}: " if path else ""
    lines = [f"{where}{problem(err)}" for err in exc.errors()]
    return "invalid configuration:\n  " + "\n  ".join(lines)
