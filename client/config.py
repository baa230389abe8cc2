"""The lab client's settings: `[mqtt]` (and the keys below) in a TOML file plus
`CELLWATCH_*` environment variables, like the node's and the hub's
(deploy/client.example.toml documents every one).

    source = "scope-1"          # images go to cellwatch/images/{username}/scope-1
    timeout_s = 60
    [mqtt]
    host = "broker.lab"
    port = 8883
    username = "client"
    password_file = "/etc/cellwatch/client.password"
    [mqtt.tls]
    enabled = true
    ca_file = "/etc/cellwatch/ca.crt"
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cellwatch.shared.schemas import Name
from cellwatch.shared.settings import CellwatchSettings, MqttSettings
from cellwatch.shared.topics import check_name

DEFAULT_USER = "client"

REPLY_SESSION_EXPIRY_S = 300
"""How long the broker keeps the client's reply session while it is disconnected,
unless `mqtt.session_expiry_s` says otherwise: long enough to cover a reconnect
(backoff at most `reconnect_max_s`, 30 s) or a broker restart, and every Result that
can still matter (`timeout_s`, 120 s); short enough that a client that died leaves
at most five minutes of Results behind. A clean close drops the session at once."""

# The retry defaults come from bench/client.py --failover (README, "Lab client"): a
# node's round trip p99 was 0.22-0.29 s with 16 images in flight, so 10 s between
# attempts leaves room for a loaded fleet before a retry duplicates work; when one of
# two nodes died, its session kept taking half of the images until it expired
# (session_expiry_s 60 s) and the last image was answered 71.5 s after the kill (at
# most 5 attempts, longest round trip 40 s). timeout_s 120 covers that worst case
# (about session expiry + retry_after_s) with room to spare; max_attempts 12 lets the
# retries run until then.


class ClientSettings(CellwatchSettings):
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    source: Name | None = Field(
        None,
        description="the scope (microscope) name: images go to cellwatch/images/{user}/{source} "
        "(none: cellwatch/images/{user})",
    )
    node: Name | None = Field(
        None,
        description="send to this node only, on its direct topic "
        "(cellwatch/nodes/{node}/images/{user}[/{source}]), instead of sharing the images "
        "among all nodes",
    )
    timeout_s: float = Field(
        120.0, gt=0, le=3600, description="give up on an image after this long (every attempt)"
    )
    retry_after_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="publish an unanswered image again after this long (>= timeout_s: never)",
    )
    max_attempts: int = Field(
        12, ge=1, le=100, description="publishes per image at most (1: never retry)"
    )
    concurrency: int = Field(
        16, ge=1, le=1024, description="images in flight at once in classify_many / the CLI"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING"

    @model_validator(mode="after")
    def _defaults(self) -> ClientSettings:
        updates: dict[str, object] = {}
        if self.mqtt.username is None:
            updates["username"] = DEFAULT_USER
        if "session_expiry_s" not in self.mqtt.model_fields_set:
            updates["session_expiry_s"] = REPLY_SESSION_EXPIRY_S
        if updates:
            self.mqtt = self.mqtt.model_copy(update=updates)
        assert self.mqtt.username is not None
        check_name(self.mqtt.username, "mqtt.username")
        if self.mqtt.client_id is not None:
            check_name(self.mqtt.client_id, "mqtt.client_id")
        return self
