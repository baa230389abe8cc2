"""A node for the tests: its settings for an in-process NodeService, and the
`cellwatch-node run` process (config file, start, wait until it says online)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellwatch.node.config import NodeSettings
from cellwatch.shared.schemas import NodeStatus
from cellwatch.shared.states import NodeState
from tests.broker import Broker
from tests.harness import Collector, T, wait_for

NODE = str(Path(sys.executable).with_name("cellwatch-node"))


def node_settings(
    broker: Broker, toy_bundle: tuple[Path, Path], node_id: str = "node-1", **overrides: Any
) -> NodeSettings:
    bundle, keys = toy_bundle
    data: dict[str, Any] = {
        "node_id": node_id,
        "mqtt": broker.settings(node_id).model_dump(),
        "model": {"bundle": bundle, "trusted_keys": keys},
        "telemetry_interval_s": 0.5,
        # per test and node id, so that a restarted node finds its own journal
        "state_dir": broker.dir.parent / "node-state" / node_id,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return NodeSettings(**data)


def write_config(
    tmp: Path,
    broker: Broker,
    bundle: Path,
    keys: Path,
    extra: str = "",
    node_id: str = "node-1",
    *,
    telemetry_interval_s: float = 1.0,
    mqtt: Mapping[str, object] | None = None,
) -> Path:
    """node.toml for a node process; `mqtt`: more [mqtt] keys (TOML values); `extra`:
    TOML appended at the end (sections)."""
    pw = tmp / f"{node_id}.password"
    pw.write_text(broker.password(node_id))
    lines = [
        f'node_id = "{node_id}"',
        f"telemetry_interval_s = {telemetry_interval_s}",
        f'state_dir = "{tmp / "state" / node_id}"',
        "[mqtt]",
        f'host = "{broker.host}"',
        f"port = {broker.port}",
        f'password_file = "{pw}"',
        *(f"{k} = {v}" for k, v in (mqtt or {}).items()),
        "[model]",
        f'bundle = "{bundle}"',
        f'trusted_keys = "{keys}"',
        extra,
    ]
    cfg = tmp / f"{node_id}.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def start_node(cfg: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [NODE, "run", "--config", str(cfg)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def wait_online(watch: Collector, count: int) -> None:
    """Until node-1 has said online `count` times (once per process start)."""

    def online() -> int:
        return sum(
            NodeStatus.model_validate_json(m.payload).state is NodeState.ONLINE
            for m in watch.on(T.status("node-1"))
        )

    wait_for(lambda: online() >= count, 60, "node online")
