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
    [http]
    listen = "127.0.0.1:8321"                   # the fleet page, /api/... and /metrics
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cellwatch.shared.hubapi import RolloutPolicy
from cellwatch.shared.limits import FETCH_CHUNK_BYTES, MAX_FETCH_CHUNK_BYTES
from cellwatch.shared.schemas import Name
from cellwatch.shared.settings import CellwatchSettings, MqttSettings, Section

DEFAULT_HTTP_LISTEN = "127.0.0.1:8321"


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) of `host:port` or `[v6]:port`; ValueError if malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{listen!r}: use HOST:PORT, e.g. 127.0.0.1:8321 or [::1]:8321")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{listen!r}: port {port} is over 65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class HttpSettings(Section):
    """The read-only HTTP server: fleet page, /api/... JSON, Prometheus /metrics."""

    enabled: bool = Field(True, description="serve the fleet page, /api and /metrics")
    listen: str = Field(
        DEFAULT_HTTP_LISTEN, description="HOST:PORT to listen on (port 0: any free port)"
    )
    token_file: Path | None = Field(
        None,
        description="file holding a bearer token: every request must then send "
        "`Authorization: Bearer TOKEN`; required to listen off loopback",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host headers accepted (e.g. a reverse proxy's name); default: the "
        "loopback names when listening on loopback (against DNS rebinding), any otherwise",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        host, _ = split_listen(self.listen)
        if self.enabled and not is_loopback(host) and self.token_file is None:
            raise ValueError(
                f"listen {self.listen} is not a loopback address: set token_file too "
                "(every request then needs Authorization: Bearer), or listen on 127.0.0.1"
            )
        return self

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


class HubLimits(Section):
    """What the hub accepts from the fleet (hub/intake.py): checked on the MQTT
    network thread before anything is queued."""

    receive_maximum: int = Field(
        16384,
        ge=20,
        le=65535,
        description="QoS 1 messages (status, update reports, API requests) the broker may "
        "have in flight to the hub unacknowledged: the hub's own buffer; beyond it the "
        "broker queues max_queued_messages more and then drops them; at least 5 x the "
        "fleet's size",
    )
    max_nodes: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="node ids the hub tracks; messages of further nodes are dropped",
    )
    status_per_s: float = Field(
        2.0,
        gt=0,
        le=1000,
        description="times per second a node's statuses are handled on average; the ones "
        "beyond wait, coalesced (the latest is always applied)",
    )
    status_burst: int = Field(
        10, ge=1, le=10_000, description="times a node's statuses may be handled at once"
    )
    telemetry_per_s: float = Field(
        2.0,
        gt=0,
        le=1000,
        description="telemetry messages per second and node the hub accepts on average",
    )
    telemetry_burst: int = Field(
        10, ge=1, le=10_000, description="telemetry messages a node may send at once"
    )
    telemetry_high_water: int = Field(
        1000,
        ge=10,
        le=1_000_000,
        description="control-queue depth above which incoming telemetry is dropped",
    )


class HubSamples(Section):
    """The field samples nodes upload (hub/samples.py, issue 20)."""

    quota_mb: float = Field(
        4096.0, gt=0, le=1_048_576, description="the samples store's size at most; beyond, refused"
    )
    retention_days: float = Field(
        180.0, gt=0, le=36500, description="a sample older than this is deleted"
    )


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
    rollout: RolloutPolicy = Field(
        default_factory=RolloutPolicy,
        description="what `rollout start` uses for each option the operator leaves out",
    )
    http: HttpSettings = Field(default_factory=HttpSettings)
    limits: HubLimits = Field(default_factory=HubLimits)
    samples: HubSamples = Field(default_factory=HubSamples)
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
        """`cellwatch-hub-{secret}` (MqttSettings.session_client_id): no other account
        can take over the hub's session."""
        return self.mqtt.session_client_id("cellwatch-hub")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hub.db"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def samples_dir(self) -> Path:
        return self.data_dir / "samples"


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


class RelayMqttSettings(MqttSettings):
    """The relay's [mqtt] section (its site's broker): no session kept while it is down,
    so that the site's other relay, if any, takes all the fetch requests at once."""

    session_expiry_s: int = Field(
        0, ge=0, le=2**32 - 1, description="how long the broker keeps the relay's session"
    )


class RelayFetchSettings(Section):
    """How the relay fetches a bundle from the hub (the node's fetch: node/fetcher.py)."""

    window: int = Field(4, ge=1, le=64, description="chunk requests in flight")
    chunk_bytes: int = Field(
        FETCH_CHUNK_BYTES, ge=1024, le=MAX_FETCH_CHUNK_BYTES, description="bytes asked per request"
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="ask for a chunk again after this")
    stall_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a chunk without an answer this long fails the fetch"
    )
    retry_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="after a failed fetch (e.g. the link is down), try again this much later; "
        "the nodes' requests wait meanwhile",
    )


class RelaySettings(CellwatchSettings):
    """A site relay (`cellwatch-hub relay`, hub/relay.py): its site broker, its cache."""

    relay_id: Name = Field(
        description="the relay's MQTT user name at its site (deploy/mkusers.sh --relay), "
        "and the id it fetches from the hub with"
    )
    mqtt: RelayMqttSettings = Field(default_factory=RelayMqttSettings)
    cache_dir: Path = Field(
        Path("relay-cache"), description="the content-addressed cache of bundles"
    )
    max_cache_bytes: int = Field(
        8 * 1024**3,
        ge=1024 * 1024,
        description="the cache's size; the bundles used least recently are removed to make "
        "room, and a bundle that does not fit is answered `unavailable`",
    )
    trusted_keys: Path | None = Field(
        None, description="directory of *.pub keys: a bundle's signature is checked too"
    )
    allow_unsigned: bool = Field(
        False, description="DEVELOPMENT ONLY: cache bundles without a trusted signature"
    )
    max_chunk_bytes: int = Field(
        FETCH_CHUNK_BYTES,
        ge=1024,
        le=MAX_FETCH_CHUNK_BYTES,
        description="largest chunk sent per request (longer requests clamped)",
    )
    hold_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="a request for a file still on its way from the hub waits this long, "
        "then is answered `not_ready` and asked again (keep it below the nodes' "
        "fetch timeout_s)",
    )
    workers: int = Field(2, ge=1, le=32, description="threads answering the site's requests")
    fetch: RelayFetchSettings = Field(default_factory=RelayFetchSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _username_is_relay_id(self) -> RelaySettings:
        if self.mqtt.username is None:
            self.mqtt = self.mqtt.model_copy(update={"username": self.relay_id})
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.session_client_id(f"cellwatch-relay-{self.relay_id}")
