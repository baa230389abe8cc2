#!/usr/bin/env python3
"""Many sites, one fleet, on this machine (DESIGN.md, Sites): a centre and N sites.

    python deploy/sites.py up   [--workdir DIR] [--sites 2] [--port 1890]   (make up SITES=2)
    python deploy/sites.py link SITE down|up [--workdir DIR]
    python deploy/sites.py down [--workdir DIR]                             (make down SITES=2)

(DIR: sites-work by default.)

`up` starts, each a process with its log in WORKDIR/logs/ and its PID in WORKDIR/pids:
- the CENTRAL broker (the project's mosquitto.conf; users and ACL by deploy/mkusers.sh
  and mkacl.sh, with a `bridge-SITE` account per site) on 127.0.0.1:PORT, and the hub on
  it (fleet page on --http-port);
- per site i (site-1, site-2, ...): the site's WAN link (deploy/sitelink.py, a TCP
  forwarder that counts bytes and can be cut) on 127.0.0.1:PORT+50+i; the SITE broker
  on 127.0.0.1:PORT+i, whose bridge (deploy/site_conf.py) reaches the central broker
  through that link and forwards only control traffic (images and Results stay at the
  site); one node, node-i (`site = "site-i"`), on the site broker. Site 1 also has a
  relay (relay-1, `cellwatch-hub relay`): its nodes' bundle fetches stay at the site
  and each bundle crosses its link once. The other sites have none: their nodes fetch
  from the hub through the bridge.

Bundles are signed with a key of the working directory. Without bundles in
WORKDIR/bundles, `up` trains a quick model (1 epoch, random base: the bundles say
UNTRAINED and NO-SKILL) and exports it as 1.0.0 (the nodes start on it) and 2.0.0 (to
roll out), pushes both to the hub, writes WORKDIR/site-i/client.toml (the lab client
at site i) and WORKDIR/hub/operator.toml, prints what to try, and returns.

`link SITE down` cuts a site's WAN link (its bridge loses the centre: the hub shows
the site's nodes `unreachable`, the site keeps classifying), `link SITE up` restores
it. `down` stops everything `up` started.

Research use only: nothing here is a diagnosis.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import broker_conf
import site_conf
from demo import prepare_workdir, setup_logging
from rich.markup import escape

from cellwatch.shared.states import NodeState
from demolib.common import (
    BIN,
    DEPLOY,
    HOST,
    MODEL_NAME,
    QUICK,
    REPO,
    DemoError,
    Layout,
    console,
    done,
    shown,
)
from demolib.hubctl import FleetView, Hub
from demolib.processes import (
    ProcessGroup,
    install_signal_handlers,
    read_pidfile,
    signal_process,
    stop_workdir,
)
from demolib.services import (
    BrokerInfo,
    cw,
    make_signing_key,
    mosquitto_executable,
    mqtt_settings,
    port_free,
    toml_str,
    wait_port,
    write_hub_toml,
)
from demolib.training import Training

DEFAULT_WORKDIR = Path("sites-work")
RELAY_SITE = 1
"""The site that has a relay."""
BRIDGE_RESTART_S = (1, 5)
"""The demo's bridges reconnect within 1-5 s of the link's return (production: 2-30 s)."""
LINK_OFFSET = 50
TLS_OFFSET = 1000


def site_name(i: int) -> str:
    return f"site-{i}"


def link_name(site: str) -> str:
    return f"link-{site}"


# -- up -------------------------------------------------------------------------------


class Sites:
    """The paths and ports of one `up`."""

    def __init__(self, layout: Layout, count: int, port: int) -> None:
        self.layout = layout
        self.count = count
        self.port = port

    def names(self) -> list[str]:
        return [site_name(i) for i in range(1, self.count + 1)]

    def dir(self, site: str) -> Path:
        return self.layout.root / site

    def index(self, site: str) -> int:
        return self.names().index(site) + 1

    def broker(self, site: str) -> BrokerInfo:
        i = self.index(site)
        return BrokerInfo(self.port + i, self.port + TLS_OFFSET + i)

    def link_port(self, site: str) -> int:
        return self.port + LINK_OFFSET + self.index(site)

    def node(self, site: str) -> str:
        return f"node-{self.index(site)}"

    def relays(self, site: str) -> list[str]:
        i = self.index(site)
        return [f"relay-{i}"] if i == RELAY_SITE else []

    def secret(self, site: str, user: str) -> Path:
        return self.dir(site) / "broker" / "secrets" / f"{user}.password"

    def ports(self) -> list[int]:
        central = [self.port, self.port + TLS_OFFSET]
        per_site = [
            p
            for s in self.names()
            for p in (self.link_port(s), self.broker(s).port, self.broker(s).tls_port)
        ]
        return central + per_site


def script(name: str, *args: str) -> None:
    proc = broker_conf.run_script(name, *args)
    if proc.returncode != 0:
        raise DemoError(f"deploy/{name} {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")


def start_broker(
    group: ProcessGroup, name: str, dir: Path, info: BrokerInfo, extra: str = ""
) -> None:
    user = getpass.getuser() if os.geteuid() == 0 else None  # as demolib.services
    src = REPO / "mosquitto.conf"
    conf = broker_conf.write(src, dir, info.port, info.tls_port, HOST, user=user)
    if extra:
        conf.write_text(conf.read_text() + extra)
    child = group.start(name, [mosquitto_executable(), "-c", str(conf)])
    wait_port(info.port, child)


def central(group: ProcessGroup, sites: Sites) -> BrokerInfo:
    layout = sites.layout
    try:
        broker_conf.make_files(layout.broker, ())
    except RuntimeError as exc:
        raise DemoError(str(exc)) from exc
    names = sites.names()
    script("mkusers.sh", *[a for s in names for a in ("--bridge", s)], str(layout.broker))
    ids = {s: [sites.node(s), *sites.relays(s)] for s in names}
    acl = [a for s in names for a in ("--bridge", f"{s}={','.join(ids[s])}")]
    script("mkacl.sh", *acl, str(layout.broker))
    info = BrokerInfo(sites.port, sites.port + TLS_OFFSET)
    start_broker(group, "mosquitto", layout.broker, info)
    done(
        f"central broker on {HOST}:{info.port}, an account bridge-SITE per site "
        f"({', '.join(names)}): ACL {shown(layout.broker / 'acl')}"
    )
    return info


def site(group: ProcessGroup, sites: Sites, name: str, centre: BrokerInfo) -> BrokerInfo:
    """The site's link, broker (with its bridge), relay if any, and node, started."""
    layout, node, relays = sites.layout, sites.node(name), sites.relays(name)
    link_port = sites.link_port(name)
    sites.dir(name).mkdir(parents=True, exist_ok=True)
    link = group.start(
        link_name(name),
        [sys.executable, str(DEPLOY / "sitelink.py"), "--listen", f"{HOST}:{link_port}",
         "--to", f"{HOST}:{centre.port}", "--state", str(sites.dir(name) / "link.json")],
    )  # fmt: skip
    wait_port(link_port, link)
    broker_dir = sites.dir(name) / "broker"
    broker_conf.make_files(broker_dir, [node])
    for relay in relays:
        script("mkusers.sh", "--relay", relay, str(broker_dir))
        script("mkacl.sh", "--relay", relay, str(broker_dir))
    password = layout.secret(f"bridge-{name}").read_text().strip()
    bridge = site_conf.bridge_section(
        name, (HOST, link_port), password, relays=tuple(relays), restart_s=BRIDGE_RESTART_S
    )
    info = sites.broker(name)
    start_broker(group, f"mosquitto-{name}", broker_dir, info, bridge)
    for relay in relays:
        cfg = sites.dir(name) / f"{relay}.toml"
        cfg.write_text(
            f"relay_id = {toml_str(relay)}\ncache_dir = {toml_str(sites.dir(name) / 'cache')}\n"
            f"trusted_keys = {toml_str(layout.trusted)}\n"
            + mqtt_section(info, sites.secret(name, relay))
        )
        group.start(relay, cw("hub", "relay", "--config", cfg))
    what = f"relay {', '.join(relays)} (fetches stay at the site)" if relays else "no relay"
    done(
        f"{name}: broker on {HOST}:{info.port}, bridged to the centre through its link "
        f"{HOST}:{link_port}; {what}"
    )
    return info


def mqtt_section(info: BrokerInfo, password_file: Path) -> str:
    return (
        f"[mqtt]\nhost = {toml_str(HOST)}\nport = {info.port}\n"
        f"password_file = {toml_str(password_file)}\nreconnect_max_s = 5.0\n"
    )


def start_node(group: ProcessGroup, sites: Sites, name: str, bundle: Path) -> None:
    node = sites.node(name)
    home = sites.dir(name) / node
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "node.toml"
    cfg.write_text(
        f'node_id = "{node}"\nsite = "{name}"\ntelemetry_interval_s = 5.0\n'
        f"state_dir = {toml_str(home / 'state')}\n"
        + mqtt_section(sites.broker(name), sites.secret(name, node))
        + f"[model]\ntrusted_keys = {toml_str(sites.layout.trusted)}\nbundle = {toml_str(bundle)}\n"
        + f"[limits]\ndecode_workers = 1\n[updates]\nstore_dir = {toml_str(home / 'store')}\n"
    )
    group.start(node, cw("node", "run", "--config", cfg))


def client_toml(sites: Sites, name: str) -> Path:
    path = sites.dir(name) / "client.toml"
    path.write_text(
        f"# cellwatch-client at {name}: its own broker (images never leave the site)\n"
        f'source = "scope-{sites.index(name)}"\n'
        + mqtt_section(sites.broker(name), sites.secret(name, "client"))
    )
    return path


def bundles(group: ProcessGroup, layout: Layout) -> tuple[Path, Path]:
    """(1.0.0, 2.0.0): found in WORKDIR/bundles, or trained and exported once."""
    v1, v2 = layout.bundle("v1"), layout.bundle("v2")
    if (v1 / "manifest.json").is_file() and (v2 / "manifest.json").is_file():
        done(f"bundles 1.0.0 and 2.0.0 from {shown(layout.root / 'bundles')}")
        return v1, v2
    training = Training(group, layout, QUICK, None)
    training.make_data()
    trained = training.train("v1", "1.0.0", QUICK.epochs)
    training.export("v2", "2.0.0", layout.run_dir("v1"), v2, "ptq", trained)
    return v1, v2


def cmd_up(args: argparse.Namespace) -> int:
    if args.sites < 1:
        raise DemoError("--sites must be at least 1")
    layout = prepare_workdir(args.workdir, fresh=False)
    setup_logging(layout)
    sites = Sites(layout, args.sites, args.port)
    for port in [*sites.ports(), args.http_port]:
        if not port_free(port):
            raise DemoError(
                f"port {port} is already in use (`python deploy/sites.py down`, or choose "
                "others: --port N --http-port H)"
            )
    console.print(f"Working directory: [bold]{escape(shown(layout.root))}[/bold]")
    group = ProcessGroup(layout, attached=False)
    install_signal_handlers()
    try:
        make_signing_key(group, layout)
        v1, v2 = bundles(group, layout)
        for broker_dir in [layout.broker, *(sites.dir(s) / "broker" for s in sites.names())]:
            # fresh broker databases: no session of an earlier run's nodes
            for data in (broker_dir / "data").glob("*.db"):
                data.unlink()
        centre = central(group, sites)
        write_hub_toml(layout, centre, args.http_port)
        hub = Hub(group, layout, centre)
        hub.serve()
        fleet = FleetView(mqtt_settings(layout, centre, "operator"), layout)
        fleet.connect()
        fleet.wait_for("that it is ready", lambda nodes: True, group.check)
        for bundle in (v1, v2):
            hub.push(bundle)
        for name in sites.names():
            site(group, sites, name, centre)
            start_node(group, sites, name, v1)
        nodes = [sites.node(s) for s in sites.names()]
        fleet.wait_for(
            f"{', '.join(nodes)} online",
            lambda seen: all(n in seen and seen[n].state is NodeState.ONLINE for n in nodes),
            group.check,
            timeout=180,
        )
        fleet.close()
        done(f"{', '.join(nodes)} online at their sites, serving 1.0.0")
        for name in sites.names():
            client_toml(sites, name)
        cheatsheet(sites, hub.operator_toml, args.http_port)
        group.detach()
        return 0
    except BaseException:
        console.print("[red]✗ `up` failed: stopping what it started")
        group.stop_all()
        raise


def cheatsheet(sites: Sites, operator_toml: Path, http_port: int) -> None:
    w = shown(sites.layout.root)
    me = f"{shown(BIN / 'python')} deploy/sites.py"
    opt = "" if sites.layout.root == DEFAULT_WORKDIR.resolve() else f" --workdir {w}"
    hub = shown(BIN / "cellwatch-hub")
    client = shown(BIN / "cellwatch-client")
    images = sorted(sites.layout.data.glob("*_1.*")) or sorted(sites.layout.data.glob("*"))
    image = shown(images[0]) if images else "smear.jpg"
    console.print()
    console.rule(f"[bold]Running: a centre and {sites.count} sites. Try it by hand", align="left")
    print(
        f"""\
Fleet page: http://{HOST}:{http_port}/  (each node's site; a site whose link is down
shows its nodes `unreachable`)
export CELLWATCH_HUB_CLIENT_CONFIG={shown(operator_toml)}
{hub} nodes

# classify at site 1 (its own broker: the image never leaves the site)
{client} classify {image} --config {w}/site-1/client.toml

# a rollout to every site (site-1's node fetches from its relay, site-2's through the bridge)
{hub} rollout start {MODEL_NAME} 2.0.0 --waves 100% --yes-untrained
{hub} rollout status ROLLOUT_ID --watch

# cut site 2's WAN link: site 2 still classifies; a rollout waits for it
{me} link site-2 down{opt}
{client} classify {image} --config {w}/site-2/client.toml
{me} link site-2 up{opt}

Bytes over each link: {w}/site-N/link.json. Logs: {w}/logs/.
Stop everything with: {me} down{opt}""",
        flush=True,
    )


# -- link, down ---------------------------------------------------------------------------


def cmd_link(args: argparse.Namespace) -> int:
    layout = Layout(args.workdir.expanduser().resolve())
    name = link_name(args.site)
    records = [r for r in read_pidfile(layout.pidfile) if r.name == name and r.alive()]
    if not records:
        raise DemoError(f"no running {name} in {shown(layout.root)} (`{sys.argv[0]} up` first?)")
    signal_process(records[-1].pid, signal.SIGUSR1 if args.state == "down" else signal.SIGUSR2)
    done(f"{args.site}'s WAN link is {args.state}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    return stop_workdir(args.workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/sites.py",
        description="A centre and N sites on this machine (the multi-site topology).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the centre and the sites and return")
    p_link = sub.add_parser("link", help="cut (down) or restore (up) a site's WAN link")
    p_down = sub.add_parser("down", help="stop what `up` started")
    for p in (p_up, p_link, p_down):
        p.add_argument(
            "--workdir",
            type=Path,
            default=DEFAULT_WORKDIR,
            help=f"working directory [default: ./{DEFAULT_WORKDIR}]",
        )
    p_up.add_argument("--sites", type=int, default=2, help="how many sites [default: 2]")
    p_up.add_argument(
        "--port",
        type=int,
        default=1890,
        help="the central broker's port; site i's broker gets PORT+i, its link PORT+50+i "
        "and TLS listeners PORT+1000(+i) [default: 1890]",
    )
    p_up.add_argument(
        "--http-port", type=int, default=8322, help="the hub's fleet page [default: 8322]"
    )
    p_link.add_argument("site", help="the site, e.g. site-2")
    p_link.add_argument("state", choices=("down", "up"))
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "up": cmd_up,
        "link": cmd_link,
        "down": cmd_down,
    }
    try:
        return handlers[args.command](args)
    except DemoError as exc:
        console.print(f"[red]✗ {escape(str(exc))}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
