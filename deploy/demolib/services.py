"""Broker, credentials, signing key and the config files of hub, nodes and operator,
made with the deploy/ scripts exactly as a production install would."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import broker_conf

from cellwatch.shared.settings import MqttSettings, TlsSettings
from demolib.common import (
    BIN,
    HOST,
    LAB_ACCOUNT,
    REPO,
    SAMPLE_RANDOM_SHARE,
    START_TIMEOUT_S,
    DemoError,
    Layout,
    command,
    done,
    shown,
)
from demolib.processes import Child, ProcessGroup, tail

# -- tools ----------------------------------------------------------------------------


def tool(name: str) -> str:
    path = BIN / name
    if not os.access(path, os.X_OK):
        raise DemoError(f"{path} not found: run `make venv` (pip install -e '.[dev]') first")
    return str(path)


def cw(part: str, *args: object) -> list[str]:
    """The command line of `cellwatch-PART ARGS...` from this virtualenv."""
    return [tool(f"cellwatch-{part}"), *(str(a) for a in args)]


def mosquitto_executable() -> str:
    found = broker_conf.mosquitto_executable()
    if found is None:
        raise DemoError(
            "Mosquitto is not installed: run `make demo` as root (it installs it with "
            "apt-get), or `sudo apt-get install mosquitto mosquitto-clients`"
        )
    return found


def port_free(port: int) -> bool:
    """Nobody listens on port (connections of a just-stopped broker do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    return broker_conf.free_port(HOST)


def wait_port(port: int, child: Child, timeout: float = START_TIMEOUT_S) -> None:
    if broker_conf.wait_listening([port], lambda: child.proc.poll() is None, timeout, HOST):
        if child.proc.poll() is not None:
            raise DemoError(
                f"{child.name} exited with code {child.proc.returncode} on start; the end "
                f"of {shown(child.log)}:\n{tail(child.log)}"
            )
        raise DemoError(f"{child.name} is not listening on port {port}")


# -- the broker -------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerInfo:
    port: int
    tls_port: int


def make_credentials(layout: Layout, nodes: Sequence[str]) -> None:
    """Users, ACL and test certificates, made with the deploy/ scripts."""
    try:
        ran = broker_conf.make_files(layout.broker, nodes)
    except RuntimeError as exc:
        raise DemoError(str(exc)) from exc
    for line in ran:
        command(line.split(" "))
    done(
        f"users hub, operator, client, {', '.join(nodes)}: passwords in "
        f"{shown(layout.broker / 'secrets')}/"
    )
    done(
        f"ACL in {shown(layout.broker / 'acl')}; test CA and server certificate in "
        f"{shown(layout.broker / 'certs')}/"
    )


def make_signing_key(group: ProcessGroup, layout: Layout) -> None:
    if not layout.sign_key.is_file():
        group.run("keygen", cw("train", "keygen", layout.signing))
    layout.trusted.mkdir(parents=True, exist_ok=True)
    shutil.copy2(layout.signing / "cellwatch.pub", layout.trusted / "cellwatch.pub")
    done(
        f"bundles are signed with {shown(layout.sign_key)}; hub and nodes trust only "
        f"the public key in {shown(layout.trusted)}/"
    )


def start_broker(group: ProcessGroup, layout: Layout, port: int, tls_port: int) -> BrokerInfo:
    # As root, Mosquitto would drop privileges to `mosquitto`, which may not be able
    # to enter the working directory: run as the current user instead (like the tests).
    user = getpass.getuser() if os.geteuid() == 0 else None
    conf: Path = broker_conf.write(
        REPO / "mosquitto.conf", layout.broker, port, tls_port, HOST, user=user
    )
    command(["deploy/broker_conf.py", "--src", "mosquitto.conf", "--out", str(layout.broker),
             "--port", str(port), "--tls-port", str(tls_port)])  # fmt: skip
    argv = [mosquitto_executable(), "-c", str(conf)]
    command(argv)
    child = group.start("mosquitto", argv)
    wait_port(port, child)
    wait_port(tls_port, child)
    done(
        f"Mosquitto runs the project's mosquitto.conf: plain MQTT on {HOST}:{port}, TLS on "
        f"localhost:{tls_port}; log {shown(child.log)}"
    )
    return BrokerInfo(port, tls_port)


def mqtt_settings(layout: Layout, broker: BrokerInfo, user: str) -> MqttSettings:
    return MqttSettings(
        host=HOST,
        port=broker.port,
        username=user,
        password_file=layout.secret(user),
        session_expiry_s=0,
        connect_timeout_s=10.0,
        reconnect_min_s=0.5,
        reconnect_max_s=2.0,
        tls=TlsSettings(),
    )


# -- configuration files ----------------------------------------------------------------


def toml_str(value: Path | str) -> str:
    return json.dumps(str(value))


def write_node_toml(
    layout: Layout, node_id: str, broker: BrokerInfo, bundle: Path | None = None
) -> Path:
    """A node on the TLS listener, with a bundle store for hub-driven updates, keeping
    field samples of the demo's lab account."""
    path = layout.node_toml(node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = f"bundle = {toml_str(bundle)}\n" if bundle is not None else ""
    path.write_text(f"""\
# cellwatch demo node (deploy/node.example.toml documents every setting)
node_id = {toml_str(node_id)}
tags = ["demo"]
telemetry_interval_s = 5.0
state_dir = {toml_str(layout.node(node_id) / "state")}

[mqtt]
host = "localhost"
port = {broker.tls_port}
password_file = {toml_str(layout.secret(node_id))}
reconnect_max_s = 5.0

[mqtt.tls]
enabled = true
ca_file = {toml_str(layout.ca_file)}

[model]
trusted_keys = {toml_str(layout.trusted)}
{start}
[limits]
decode_workers = 1

[updates]
store_dir = {toml_str(layout.node(node_id) / "store")}

# Field samples (README "Field samples"). Collection is per-source consent and OFF by
# default in production (deploy/node.example.toml, deploy/PRODUCTION.md); the demo's lab
# account consents, at demo rates: half its images as `random`, the others when inside
# the bundle's low-confidence band, limits above the demo's image counts, and an upload
# rate that moves a few dozen samples to the hub in seconds.
[samples]
enabled = true
sources = [{toml_str(LAB_ACCOUNT)}]
random_share = {SAMPLE_RANDOM_SHARE}
low_confidence = true
disagreement = false
per_hour = {{ low_confidence = 500, disagreement = 0, random = 500 }}
per_day = {{ low_confidence = 2000, disagreement = 0, random = 2000 }}
quota_mb = 64.0
upload_bytes_per_s = 8388608
""")
    return path


def write_operator_toml(layout: Layout, broker: BrokerInfo) -> Path:
    """The operator's connection for `cellwatch-hub push/rollout/nodes/models`."""
    path = layout.hub / "operator.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""\
# cellwatch-hub operator commands: --config this file,
# or export CELLWATCH_HUB_CLIENT_CONFIG=<this file>
[mqtt]
host = {toml_str(HOST)}
port = {broker.port}
username = "operator"
password_file = {toml_str(layout.secret("operator"))}
""")
    return path


def fleet_url(http_port: int) -> str:
    return f"http://{HOST}:{http_port}/"


def write_client_toml(layout: Layout, broker: BrokerInfo) -> Path:
    """The lab client's connection for `cellwatch-client` (user `client`)."""
    path = layout.client_toml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""\
# cellwatch-client: --config this file, or export CELLWATCH_CLIENT_CONFIG=<this file>
# (deploy/client.example.toml documents every setting)
source = "scope-1"

[mqtt]
host = {toml_str(HOST)}
port = {broker.port}
username = "client"
password_file = {toml_str(layout.secret("client"))}
""")
    return path


def write_hub_toml(layout: Layout, broker: BrokerInfo, http_port: int) -> Path:
    """The hub's config: the broker's loopback listener, the fleet page on http_port."""
    path = layout.hub_toml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""\
# cellwatch demo hub (deploy/hub.example.toml documents every setting)
data_dir = {toml_str(layout.hub / "data")}
trusted_keys = {toml_str(layout.trusted)}
tick_s = 0.5

[mqtt]
host = {toml_str(HOST)}
port = {broker.port}
password_file = {toml_str(layout.secret("hub"))}

[rollout]
node_timeout_s = 300

[http]
listen = "{HOST}:{http_port}"
""")
    return path
