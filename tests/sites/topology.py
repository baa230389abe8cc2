"""Sites on one machine, as deploy/ sets them up (DESIGN.md, Sites): a central broker
(the project's mosquitto.conf, with a bridge account per site made by mkusers.sh /
mkacl.sh --bridge) and, per site, a broker whose bridge deploy/site_conf.py writes.
Each bridge reaches the central broker through a `Link` (deploy/sitelink.py) on a
loopback port: it counts the bytes that cross, and a test cuts and restores it as a
WAN outage would. The hub, nodes and relays are real processes with config files.

A test-only `spy` account on the central broker reads every topic (`#`): what it
never sees did not leave the site.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import HubUnavailable
from cellwatch.node.fetcher import Fetcher
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.rpc.edge import Edge
from tests.broker import DEPLOY, Broker, run_script
from tests.harness import Collector, T, wait_for
from tests.security.stack import BIN, Process

if str(DEPLOY) not in sys.path:
    sys.path.insert(0, str(DEPLOY))

import site_conf  # deploy/ is not a package: the demo imports its modules the same way
import sitelink

HOST = "127.0.0.1"
BRIDGE_RESTART_S = (1, 2)
"""Tests reconnect bridges within 1-2 s of the link's return (production: 2-30 s)."""
SPY = "spy"
__all__ = [
    "SPY",
    "Site",
    "World",
    "central_broker",
    "fetch_bundle",
    "make_site",
    "site_conf",
    "sitelink",
    "spy",
    "wait_hub",
]


def central_broker(dir: Path, sites: dict[str, Sequence[str]]) -> Broker:
    """The central broker: users hub, operator and client, `bridge-SITE` for each site
    with the ids (nodes and relays) at that site, and the test-only spy."""
    dir.mkdir(parents=True, exist_ok=True)
    bridges = [a for s in sites for a in ("--bridge", s)]
    run_script("mkusers.sh", *bridges, str(dir))
    acl = [a for s, ids in sites.items() for a in ("--bridge", f"{s}={','.join(ids)}")]
    run_script("mkacl.sh", *acl, str(dir))
    broker = Broker.create(dir, nodes=())
    add_spy(broker)
    return broker


def add_spy(broker: Broker) -> None:
    """A user that reads every topic of the broker (test only)."""
    password = uuid.uuid4().hex
    (broker.dir / "secrets" / f"{SPY}.password").write_text(password + "\n")
    subprocess.run(
        ["mosquitto_passwd", "-b", str(broker.dir / "passwd"), SPY, password],
        check=True,
        capture_output=True,
    )
    with (broker.dir / "acl").open("a") as acl:
        acl.write(f"\n# test only: reads everything\nuser {SPY}\ntopic read #\n")
    broker.reload()


@dataclass
class Site:
    name: str
    broker: Broker
    link: sitelink.Link
    nodes: list[str]
    relays: list[str]

    def stop(self) -> None:
        self.broker.close_clients()
        self.broker.stop()
        self.link.close()


def make_site(
    dir: Path,
    central: Broker,
    name: str,
    nodes: Sequence[str],
    relays: Sequence[str] = (),
    *,
    password: str | None = None,
    rate_bytes_s: float = 0.0,
) -> Site:
    """A site's broker (users and ACL of its nodes and relays; its bridge to the central
    broker through a new Link), started."""
    link = sitelink.Link((HOST, 0), (central.host, central.port), rate_bytes_s=rate_bytes_s)
    link.start()
    dir.mkdir(parents=True, exist_ok=True)
    if relays:
        extra = [a for r in relays for a in ("--relay", r)]
        run_script("mkusers.sh", *extra, str(dir))
        run_script("mkacl.sh", *extra, str(dir))
    bridge = site_conf.bridge_section(
        name,
        (HOST, link.port),
        password if password is not None else central.password(f"bridge-{name}"),
        relays=tuple(relays),
        restart_s=BRIDGE_RESTART_S,
    )
    broker = Broker.create(dir, nodes=nodes, extra_config=bridge)
    return Site(name, broker, link, list(nodes), list(relays))


def spy(central: Broker) -> Collector:
    """Everything published on the central broker from now on."""
    return Collector(central.settings(SPY), "#", name="spy")


@dataclass
class World:
    """Config files and processes of a topology in `work`."""

    work: Path
    central: Broker
    sites: dict[str, Site]
    bundle: Path
    keys: Path
    processes: list[Process] = field(default_factory=list)

    def secret(self, broker: Broker, user: str) -> Path:
        path = self.work / "secrets" / broker.dir.name / f"{user}.password"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(broker.password(user))
        return path

    def mqtt_section(self, broker: Broker, user: str) -> str:
        return (
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            f'username = "{user}"\npassword_file = "{self.secret(broker, user)}"\n'
            "reconnect_max_s = 1.0\n"
        )

    def hub(self, extra: str = "") -> Process:
        """The hub on the central broker (not started)."""
        cfg = self.work / "hub.toml"
        cfg.write_text(
            f'data_dir = "{self.work / "hub"}"\ntrusted_keys = "{self.keys}"\ntick_s = 0.2\n'
            f"{extra}[http]\nenabled = false\n" + self.mqtt_section(self.central, "hub")
        )
        return self._process("hub", [str(BIN / "cellwatch-hub"), "serve", "--config", str(cfg)])

    def node(self, site: str, node_id: str) -> Process:
        """A node at a site (not started): serves the world's bundle, takes rollouts."""
        broker = self.sites[site].broker
        cfg = self.work / f"{node_id}.toml"
        cfg.write_text(
            f'node_id = "{node_id}"\nsite = "{site}"\ntelemetry_interval_s = 1.0\n'
            f'state_dir = "{self.work / "state" / node_id}"\n'
            + self.mqtt_section(broker, node_id)
            + f'[model]\nbundle = "{self.bundle}"\ntrusted_keys = "{self.keys}"\n'
            + f'[updates]\nstore_dir = "{self.work / "store" / node_id}"\n'
        )
        return self._process(node_id, [str(BIN / "cellwatch-node"), "run", "--config", str(cfg)])

    def relay(self, site: str, relay_id: str, extra: str = "") -> Process:
        """A relay at a site (not started), its cache in work/cache/RELAY_ID."""
        broker = self.sites[site].broker
        cfg = self.work / f"{relay_id}.toml"
        cfg.write_text(
            f'relay_id = "{relay_id}"\ncache_dir = "{self.cache_dir(relay_id)}"\n'
            f'trusted_keys = "{self.keys}"\nhold_s = 1.0\n{extra}'
            + self.mqtt_section(broker, relay_id)
            + "[fetch]\ntimeout_s = 2.0\nstall_timeout_s = 4.0\nretry_s = 1.0\n"
        )
        return self._process(relay_id, [str(BIN / "cellwatch-hub"), "relay", "--config", str(cfg)])

    def cache_dir(self, relay_id: str) -> Path:
        return self.work / "cache" / relay_id

    def operator_config(self) -> Path:
        cfg = self.work / "operator.toml"
        cfg.write_text("timeout_s = 30\n" + self.mqtt_section(self.central, "operator"))
        return cfg

    def _process(self, name: str, argv: list[str]) -> Process:
        p = Process(name, argv, self.work / f"{name}.log")
        self.processes.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


def wait_hub(central: Broker) -> None:
    """Until the hub answers (a request sent before it subscribed is never answered)."""
    probe = HubClient(central.settings("operator"), timeout_s=1.0)
    probe.connect()

    def answers() -> bool:
        try:
            probe.stats()
        except HubUnavailable:
            return False
        return True

    try:
        wait_for(answers, 60, "the hub to answer")
    finally:
        probe.close()


def fetch_bundle(
    broker: Broker,
    node_id: str,
    manifest_sha256: str,
    dest: Path,
    *,
    timeout_s: float = 2.0,
    stall_timeout_s: float = 30.0,
) -> int:
    """A simulated node on a site's broker fetches a whole bundle with the node's own
    Fetcher (from the site's relay, or from the hub through the bridge); checks every
    file against the manifest; the bytes received."""
    mqtt = MqttClient(
        broker.settings(node_id), client_id=f"sim-{node_id}-{os.urandom(4).hex()}", clean_start=True
    )
    fetcher = Fetcher(mqtt, T, node_id, timeout_s=timeout_s, stall_timeout_s=stall_timeout_s)
    Edge(mqtt).add(fetcher.route())
    mqtt.connect()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST_FILE, SIGNATURE_FILE):
            fetcher.fetch(manifest_sha256, name, dest / name)
        assert _sha(dest / MANIFEST_FILE) == manifest_sha256
        manifest = Manifest.model_validate_json((dest / MANIFEST_FILE).read_bytes())
        for name, entry in manifest.files.items():
            fetcher.fetch(manifest_sha256, name, dest / name, expected_size=entry.size)
            assert _sha(dest / name) == entry.sha256, name
        return fetcher.bytes_received
    finally:
        fetcher.close()
        mqtt.disconnect()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
