#!/usr/bin/env python3
"""A site's broker: the project's mosquitto.conf plus a Mosquitto bridge (MQTT v5) to
the central broker of the hub that forwards only cellwatch's control traffic
(DESIGN.md, Sites), and the check that catches a bridge that forwards more.

    python deploy/site_conf.py render --src mosquitto.conf --site SITE --central HOST:PORT \\
        --password-file FILE [--cafile CA] [--relay RELAY_ID]... [--prefix P] [--out FILE]
    python deploy/site_conf.py render ... --out-dir DIR --port N --tls-port M   (tests, demo)
    python deploy/site_conf.py check FILE [--prefix P]

`render` writes the site broker's configuration: every line of --src (with
--out-dir, moved to the given ports and into DIR like deploy/broker_conf.py), then a
`connection cellwatch-SITE` block. The block forwards exactly FORWARDS below, each
direction named as DESIGN.md names it; images and Results never leave the site. It
logs in to the central broker as `bridge-SITE` (deploy/mkusers.sh --bridge SITE) with
the password from --password-file, written into the file: the output is created mode
0600 (as root, make it root:mosquitto 0640). With --relay (a site relay,
`cellwatch-hub relay`), the nodes' fetch requests stay at the site and only the
relay's own cross; without, they cross as on a single broker. The bridge announces
its link on `PREFIX/sites/SITE/bridge` on both brokers (Mosquitto's notifications:
`1` retained while connected, `0` by its Will when the link drops), which is how the
hub knows the site is unreachable.

`check` reads a broker configuration and exits 1, one line per problem, when a
bridge forwards a topic cellwatch does not forward (a pattern such as
`cellwatch/#`, which would carry the site's images and Results to the centre),
remaps topics, forwards both ways, or lacks the settings the hub relies on. Run it on
every site configuration before deploying it: Mosquitto applies no ACL of the site
to its own bridge, so its `topic` lines are the site's only rule of what leaves.

Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import broker_conf

DEFAULT_PREFIX = "cellwatch"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BRIDGE_USER = "bridge-{site}"
CONNECTION = "cellwatch-{site}"
NOTIFICATION = "{prefix}/sites/{site}/bridge"
KEEPALIVE_S = 30
"""The bridge's keep-alive: a link that dies without a TCP reset is noticed (and the
site shown unreachable) within 1.5 times this."""
RESTART_S = (2, 30)
"""Reconnect after a random time between these (Mosquitto's decorrelated jitter)."""


@dataclass(frozen=True)
class Forward:
    """One direction of the bridge: what DESIGN.md calls it, and its topic."""

    name: str
    direction: str
    """`out`: site -> centre; `in`: centre -> site."""
    leaf: str
    """The topic under the prefix; `{relay}` for a relay's own fetch topics."""
    qos: int


FORWARDS: tuple[Forward, ...] = (
    Forward("node status", "out", "nodes/+/status", 1),
    Forward("telemetry", "out", "nodes/+/telemetry", 0),
    Forward("update reports", "out", "nodes/+/update", 1),
    Forward("shadow reports", "out", "nodes/+/shadow-report", 1),
    Forward("fetch requests", "out", "hub/fetch/+", 1),
    Forward("desired models", "in", "nodes/+/desired", 1),
    Forward("shadow orders", "in", "nodes/+/shadow", 1),
    Forward("the revocation list", "in", "hub/revoked", 1),
    Forward("fetch replies", "in", "nodes/+/fetch", 1),
    Forward("field samples", "out", "hub/samples/+/+", 1),
    Forward("field sample answers", "in", "nodes/+/samples", 1),
)
"""Every topic a site's bridge forwards (DESIGN.md, Sites)."""

RELAY_FORWARDS: tuple[Forward, ...] = (
    Forward("the relay's fetch requests", "out", "hub/fetch/{relay}", 1),
    Forward("the relay's fetch replies", "in", "nodes/{relay}/fetch", 1),
)
"""With a site relay: its fetch requests and replies instead of the nodes'."""
NODE_FETCH = ("hub/fetch/+", "nodes/+/fetch")
"""The nodes' fetch topics, which stay at a site that has a relay."""

FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("images", "images/#"),
    ("images to one node", "nodes/+/images/#"),
    ("Results", "results/#"),
    ("Results on Response Topics", "replies/#"),
    ("hub API requests", "hub/api/#"),
)
"""What never crosses a bridge (DESIGN.md, Trust and Sites), named for the check."""


def check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
    return value


def forwards(relays: tuple[str, ...] = ()) -> list[Forward]:
    """FORWARDS for a site with these relays (none: the nodes fetch through the bridge)."""
    out = [f for f in FORWARDS if not (relays and f.leaf in NODE_FETCH)]
    for relay in relays:
        out += [
            Forward(f.name, f.direction, f.leaf.format(relay=relay), f.qos) for f in RELAY_FORWARDS
        ]
    return out


def client_id(base: str, username: str, password: str) -> str:
    """`{base}-{secret}`: the same derivation as shared/settings.py's
    session_client_id (no other account can take over the bridge's session)."""
    message = f"cellwatch client id\0{username}\0{base}".encode()
    return f"{base}-{hmac.new(password.encode(), message, hashlib.sha256).hexdigest()[:32]}"


def bridge_section(
    site: str,
    central: tuple[str, int],
    password: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    relays: tuple[str, ...] = (),
    cafile: Path | None = None,
    restart_s: tuple[int, int] = RESTART_S,
) -> str:
    """The `connection` block of site's bridge (see the module docstring); restart_s:
    the bridge reconnects after a random time between these (base, cap)."""
    check_name(site, "site")
    for relay in relays:
        check_name(relay, "relay id")
    if not password or "\n" in password:
        raise ValueError("the bridge's password must be one non-empty line")
    user = BRIDGE_USER.format(site=site)
    name = CONNECTION.format(site=site)
    host, port = central
    lines = [
        "",
        f"# --- Bridge to the central broker (deploy/site_conf.py, site {site}) ---------------",
        "# Only cellwatch's control traffic crosses (DESIGN.md, Sites); images and Results",
        "# stay on this broker. Check any change with `deploy/site_conf.py check`.",
        f"connection {name}",
        f"address {host}:{port}",
        "bridge_protocol_version mqttv50",
        "# The central broker's account of this bridge (mkusers.sh / mkacl.sh --bridge).",
        f"remote_username {user}",
        f"remote_password {password}",
        "# Client ids only the password's holder can compute (no session takeover).",
        f"remote_clientid {client_id(name, user, password)}",
        f"local_clientid {client_id(name + '-local', user, password)}",
        "# Keep the session on the central broker: desired models and fetch replies",
        "# written while the link was down are delivered when it returns.",
        "cleansession false",
        f"keepalive_interval {KEEPALIVE_S}",
        f"restart_timeout {restart_s[0]} {restart_s[1]}",
        "# `1` (retained) while the link is up, `0` (the bridge's Will) when it drops: the",
        "# hub shows the site unreachable, not its nodes failed.",
        "notifications true",
        f"notification_topic {NOTIFICATION.format(prefix=prefix, site=site)}",
    ]
    if cafile is not None:
        lines += [
            "# TLS to the central broker; its certificate must name the address above.",
            f"bridge_cafile {cafile}",
            "bridge_insecure false",
        ]
    else:
        lines += ["# No TLS: only for a central broker on this machine or a trusted network."]
    for f in forwards(relays):
        lines += [f"# {f.name} ({'site -> centre' if f.direction == 'out' else 'centre -> site'})"]
        lines += [f"topic {prefix}/{f.leaf} {f.direction} {f.qos}"]
    return "\n".join(lines) + "\n"


# -- the check -------------------------------------------------------------------------


def overlaps(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT topic filters a and b."""
    x, y = a.split("/"), b.split("/")
    for i in range(max(len(x), len(y))):
        if i >= len(x) or i >= len(y):
            rest = y[i:] if i >= len(x) else x[i:]
            return rest == ["#"]  # `a/#` also matches `a`
        if "#" in (x[i], y[i]):
            return True
        if x[i] != y[i] and "+" not in (x[i], y[i]):
            return False
    return True


@dataclass(frozen=True)
class TopicLine:
    line: int
    pattern: str
    direction: str
    qos: int
    local_prefix: str
    remote_prefix: str


@dataclass
class Bridge:
    name: str
    line: int
    options: dict[str, str]
    topics: list[TopicLine]


def parse(text: str) -> list[Bridge]:
    """The bridges (`connection` blocks) of a Mosquitto configuration."""
    bridges: list[Bridge] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        option, _, value = line.partition(" ")
        value = value.strip()
        if option == "connection":
            bridges.append(Bridge(value, number, {}, []))
        elif not bridges:
            continue
        elif option == "topic":
            parts = value.split()
            direction = parts[1] if len(parts) > 1 else "out"
            qos = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
            local = parts[3] if len(parts) > 3 and parts[3] != '""' else ""
            remote = parts[4] if len(parts) > 4 and parts[4] != '""' else ""
            bridges[-1].topics.append(TopicLine(number, parts[0], direction, qos, local, remote))
        else:
            bridges[-1].options[option] = value
    return bridges


def _carries(pattern: str, prefix: str) -> list[str]:
    return [what for what, leaf in FORBIDDEN if overlaps(pattern, f"{prefix}/{leaf}")]


def check(text: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The problems of every bridge in a configuration (empty: it forwards only what a
    site forwards)."""
    problems: list[str] = []
    bridges = parse(text)
    allowed_leaves = {(f.direction, f.leaf) for f in FORWARDS}
    relay_leaves = {(f.direction, f.leaf) for f in RELAY_FORWARDS}
    for b in bridges:
        where = f"bridge {b.name} (line {b.line})"
        if b.options.get("bridge_protocol_version") != "mqttv50":
            problems.append(f"{where}: needs `bridge_protocol_version mqttv50`")
        if b.options.get("cleansession", "false") != "false":
            problems.append(f"{where}: needs `cleansession false` (messages wait for the link)")
        notification = b.options.get("notification_topic", "")
        if b.options.get("notifications", "true") != "true" or not re.match(
            rf"^{re.escape(prefix)}/sites/[A-Za-z0-9_-]{{1,64}}/bridge$", notification
        ):
            problems.append(
                f"{where}: needs `notifications true` and `notification_topic "
                f"{prefix}/sites/SITE/bridge` (how the hub knows the site's link)"
            )
        relays: set[str] = set()
        node_fetch = False
        for t in b.topics:
            at = f"line {t.line}: topic {t.pattern} {t.direction}"
            carried = _carries(f"{t.local_prefix}{t.pattern}", prefix)
            if carried:
                problems.append(
                    f"{at}: forwards too much: it would carry {', '.join(carried)} across "
                    "the bridge; these stay at the site"
                )
                continue
            if t.local_prefix or t.remote_prefix:
                problems.append(f"{at}: remaps topics; cellwatch uses the same topics everywhere")
                continue
            if t.direction == "both":
                problems.append(f"{at}: forwards both ways; each topic crosses one way only")
                continue
            leaf = t.pattern[len(prefix) + 1 :] if t.pattern.startswith(f"{prefix}/") else None
            relay = _relay_of(leaf, t.direction)
            if leaf is not None and (t.direction, leaf) in allowed_leaves:
                node_fetch = node_fetch or leaf in NODE_FETCH
            elif relay is not None and (t.direction, _as_relay(leaf, relay)) in relay_leaves:
                relays.add(relay)
            else:
                names = ", ".join(f"{prefix}/{f.leaf} {f.direction}" for f in FORWARDS)
                problems.append(
                    f"{at}: is not a topic a site forwards ({names}; with a relay, "
                    f"{prefix}/hub/fetch/RELAY out and {prefix}/nodes/RELAY/fetch in)"
                )
        if relays and node_fetch:
            problems.append(
                f"{where}: forwards the nodes' fetch topics and has a relay "
                f"({', '.join(sorted(relays))}): with a relay they stay at the site, or the "
                "hub and the relay both answer"
            )
    return problems


def _relay_of(leaf: str | None, direction: str) -> str | None:
    """The relay id of `hub/fetch/ID` (out) or `nodes/ID/fetch` (in), if a valid name."""
    if leaf is None:
        return None
    parts = leaf.split("/")
    candidate = None
    if direction == "out" and len(parts) == 3 and parts[:2] == ["hub", "fetch"]:
        candidate = parts[2]
    elif direction == "in" and len(parts) == 3 and parts[0] == "nodes" and parts[2] == "fetch":
        candidate = parts[1]
    return candidate if candidate is not None and NAME_RE.match(candidate) else None


def _as_relay(leaf: str | None, relay: str) -> str:
    return (leaf or "").replace(relay, "{relay}")


# -- command line ------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: use HOST:PORT (the central broker)")
    return host, int(port)


def _write_private(path: Path, text: str) -> None:
    """Write text to path, readable by its owner only (it holds the bridge's password)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A site broker's configuration with its bridge to the central broker, "
        "and the check of a bridge's topics (deploy/site_conf.py --help)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="write a site broker's configuration")
    render.add_argument("--src", type=Path, required=True, help="the project's mosquitto.conf")
    render.add_argument("--site", required=True, help="the site's name ([A-Za-z0-9_-]{1,64})")
    render.add_argument("--central", type=_address, required=True, help="central broker HOST:PORT")
    render.add_argument(
        "--password-file", type=Path, required=True, help="the bridge-SITE account's password"
    )
    render.add_argument("--cafile", type=Path, help="CA of the central broker (TLS)")
    render.add_argument("--relay", action="append", default=[], help="a site relay's id")
    render.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix")
    render.add_argument("--out", type=Path, help="the file to write (default: stdout)")
    render.add_argument("--out-dir", type=Path, help="relocate ports and paths into DIR")
    render.add_argument("--port", type=int, help="with --out-dir: the plain listener's port")
    render.add_argument("--tls-port", type=int, help="with --out-dir: the TLS listener's port")
    render.add_argument("--user", help="with --out-dir: replace the `user` line")
    chk = sub.add_parser("check", help="exit 1 if a bridge forwards more than a site does")
    chk.add_argument("file", type=Path)
    chk.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            text = args.file.read_text()
            problems = check(text, args.prefix)
            if not parse(text):
                problems = ["no bridge (`connection`) in it"]
            for p in problems:
                print(f"{args.file}: {p}", file=sys.stderr)
            if not problems:
                print(f"{args.file}: every bridge forwards only what a site forwards")
            return 1 if problems else 0
        password = args.password_file.read_text().strip()
        section = bridge_section(
            args.site,
            args.central,
            password,
            prefix=args.prefix,
            relays=tuple(args.relay),
            cafile=args.cafile,
        )
        if args.out_dir is not None:
            if args.port is None or args.tls_port is None:
                parser.error("--out-dir needs --port and --tls-port")
            conf = broker_conf.write(
                args.src, args.out_dir, args.port, args.tls_port, user=args.user
            )
            text = conf.read_text() + section
            _write_private(conf, text)
            print(conf)
            return 0
        text = args.src.read_text() + section
        if args.out is None:
            sys.stdout.write(text)
        else:
            _write_private(args.out, text)
    except (OSError, ValueError) as exc:
        print(f"site_conf.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
