#!/usr/bin/env python3
"""The one-command demo: the whole cellwatch system, end to end, on this machine.

    python deploy/demo.py run  [--workdir DIR] [--quick] [--checkpoint PATH]   (make demo)
    python deploy/demo.py up   [--workdir DIR] [--port N] [--tls-port M]        (make up)
    python deploy/demo.py down [--workdir DIR]                                  (make down)

`run` makes broker credentials and a signing key with the deploy/ scripts, starts
Mosquitto from the project's mosquitto.conf, a hub and two nodes, trains and exports a
signed model bundle, rolls it out with `cellwatch-hub`, classifies the held-out test
images over MQTT v5, sends a fresh batch "from the field" whose samples the nodes keep
and upload (exported, labelled from the generator's truth, imported, halved), then
trains a second version with half of them, measures both on the other half, pushes and
rolls it out while images keep flowing, and stops everything it started. Every child
process writes its own log in WORKDIR/logs/, and their PIDs are recorded in WORKDIR/pids
so that `down` (or the next run) can stop whatever an interrupted run left behind.
WORKDIR/summary.json holds the facts of the run for machines (tests/demo/test_demo.py
reads it).

`up` starts the broker (ports 1883/8883), the hub and one node with the same
configuration (it keeps field samples of the lab account: `cellwatch-hub samples
list`), writes WORKDIR/client.toml for `cellwatch-client` and returns, so the README's
cellwatch-client / mosquitto_pub / mosquitto_sub / cellwatch-hub examples can be typed
by hand; `down` stops them.

Research use only: nothing here is a diagnosis; the demo's images are SYNTHETIC.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape

from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.states import NodeState
from demolib.common import (
    BIN,
    DEFAULT_WORKDIR,
    FULL,
    HOST,
    MARKER,
    QUICK,
    UP_NODES,
    DemoError,
    Interrupted,
    Layout,
    command,
    console,
    doing,
    done,
    duration,
    shown,
)
from demolib.hubctl import Hub
from demolib.processes import install_signal_handlers, stop_recorded, stop_workdir
from demolib.scenario import Demo
from demolib.services import (
    BrokerInfo,
    cw,
    fleet_url,
    make_credentials,
    make_signing_key,
    port_free,
    start_broker,
    write_client_toml,
    write_hub_toml,
    write_node_toml,
)

# -- commands ----------------------------------------------------------------------------


def prepare_workdir(root: Path, *, fresh: bool) -> Layout:
    """The working directory: refuses a directory the demo did not make; stops what an
    earlier run left running; with fresh, empties it."""
    root = root.expanduser().resolve()
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DemoError(
            f"{root} is not empty and was not made by the demo; choose another "
            "--workdir (the demo deletes its contents)"
        )
    layout = Layout(root)
    stop_recorded(layout)
    if fresh and root.exists():
        for entry in root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != MARKER:
                entry.unlink()
    layout.logs.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by deploy/demo.py; `make down` stops its processes\n")
    return layout


def setup_logging(layout: Layout) -> None:
    """Library logs (MQTT connects, warnings) go to logs/demo.log, not the screen."""
    handler = logging.FileHandler(layout.logs / "demo.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def cmd_run(args: argparse.Namespace) -> int:
    profile = QUICK if args.quick else FULL
    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else None
    if checkpoint is not None and not (
        checkpoint.exists() or checkpoint.with_name(checkpoint.name + ".index").exists()
    ):
        raise DemoError(
            f"CHECKPOINT {checkpoint} does not exist (the TF-Slim "
            "inception_v3.ckpt; see the README)"
        )
    layout = prepare_workdir(args.workdir, fresh=True)
    setup_logging(layout)
    console.print(
        f"[bold]cellwatch demo[/bold]{' (quick)' if args.quick else ''}: the whole "
        "system on this machine. Research use only; the images are SYNTHETIC."
    )
    console.print(
        f"Working directory: [bold]{escape(shown(layout.root))}[/bold] "
        "(everything the demo makes goes there; Ctrl-C stops it cleanly)"
    )
    if args.http_port and not port_free(args.http_port):
        raise DemoError(f"port {args.http_port} is in use: choose another with --http-port N")
    demo = Demo(
        layout,
        profile,
        checkpoint,
        http_port=args.http_port,
        accurate_int8=args.int8 == "accurate",
    )
    atexit.register(demo.group.stop_all)
    install_signal_handlers()
    code = 1
    try:
        demo.run()
        code = 0
    except Interrupted as exc:
        console.print(f"\n[yellow]interrupted ({exc}): stopping everything the demo started")
        demo.summary.error = f"interrupted by {exc}"
        code = 130
    except (DemoError, CellwatchError) as exc:
        console.print(f"\n[red]✗ {escape(str(exc))}")
        demo.summary.error = str(exc)
    finally:
        demo.finish()
    if code == 0:
        console.print(
            f"\n[bold green]Demo finished[/bold green] in {duration(demo.summary.total_s)}. "
            "Next: `make up` to try it by hand, `make test` for the test suite."
        )
    return code


def cmd_up(args: argparse.Namespace) -> int:
    """Broker on fixed ports, hub, one node: for typing the README's examples by hand."""
    layout = prepare_workdir(args.workdir, fresh=False)
    setup_logging(layout)
    for port in (args.port, args.tls_port, args.http_port):
        if not port_free(port):
            raise DemoError(
                f"port {port} is already in use (another Mosquitto or hub? `sudo systemctl "
                f"stop mosquitto`, `make down`, or choose others: python deploy/demo.py up "
                "--port N --tls-port M --http-port H)"
            )
    console.print(f"Working directory: [bold]{escape(shown(layout.root))}[/bold]")
    demo = Demo(layout, QUICK, None, attached=False, http_port=args.http_port)
    install_signal_handlers()
    try:
        make_credentials(layout, UP_NODES)
        make_signing_key(demo.group, layout)
        # A fresh broker database: sessions of an earlier run's nodes (node-2) would
        # otherwise keep their share of the shared subscription's images.
        shutil.rmtree(layout.broker / "data", ignore_errors=True)
        broker = start_broker(demo.group, layout, args.port, args.tls_port)
        demo.broker = broker
        demo.connect_clients(broker)
        write_hub_toml(layout, broker, demo.http_port)
        demo._hub = Hub(demo.group, layout, broker)
        demo.hub.serve()
        demo.fleet.wait_for("that it is ready", lambda nodes: True, demo.group.check)
        done(f"hub running; fleet page {fleet_url(demo.http_port)}")
        bundles = sorted(layout.root.glob("bundles/*/manifest.json"))
        if not bundles:
            doing("no bundle from an earlier `make demo` here: training a quick one (1 epoch)")
            demo.training.make_data()
            demo.training.train("v1", "1.0.0", QUICK.epochs)
            bundles = sorted(layout.root.glob("bundles/*/manifest.json"))
        for manifest in bundles:
            demo.hub.push(manifest.parent)
        latest = bundles[-1].parent
        toml = write_node_toml(layout, UP_NODES[0], broker, bundle=latest)
        argv = cw("node", "run", "--config", toml)
        command(argv)
        node = UP_NODES[0]
        before = demo.fleet.nodes().get(node)
        demo.group.start(node, argv)
        demo.fleet.wait_for(
            f"{node} online",
            lambda nodes: (
                node in nodes
                and nodes[node].state is NodeState.ONLINE
                and (before is None or nodes[node].boot_id != before.boot_id)
            ),
            demo.group.check,
        )
        done(f"{node} online, serving {demo.fleet.serving().get(node) or 'no model'}")
        demo.lab.close()
        demo.fleet.close()
        write_client_toml(layout, broker)
        print_cheatsheet(layout, broker, demo.http_port)
        demo.group.detach()
        return 0
    except BaseException:
        console.print("[red]✗ `up` failed: stopping what it started")
        demo.group.stop_all()
        raise


def print_cheatsheet(layout: Layout, broker: BrokerInfo, http_port: int) -> None:
    w = shown(layout.root)
    images = sorted(layout.data.glob("*_1.*")) or sorted(layout.data.glob("*"))
    image = shown(images[0]) if images else "smear.jpg"
    pw = f'"$(cat {shown(layout.secret("client"))})"'
    url = fleet_url(http_port)
    console.print()
    console.rule("[bold]Running: broker, hub and node-1. Try it by hand", align="left")
    print(
        f"""\
Broker: {HOST}:{broker.port} (plain, loopback) and localhost:{broker.tls_port} (TLS, CA \
{w}/broker/certs/ca.crt); passwords in {w}/broker/secrets/

Fleet page (live, read-only): {url}
# Prometheus metrics and the JSON the CLI's --json prints
curl -s {url.removeprefix("http://")}metrics | grep cellwatch_
curl -s {url}api/nodes

# classify images with the lab client (connection in {w}/client.toml)
{shown(BIN / "cellwatch-client")} classify {w}/data/*.tif --config {w}/client.toml --json

# the same by hand (MQTT v5 request/response)
mosquitto_sub -V mqttv5 -p {broker.port} -u client -P {pw} -t 'cellwatch/replies/client/#' -C 1 &
mosquitto_pub -V mqttv5 -p {broker.port} -u client -P {pw} -q 1 \\
  -t cellwatch/images/client/scope-1 -f {image} \\
  -D publish response-topic cellwatch/replies/client/me -D publish correlation-data req-1

# the operator's view (user operator; connection in {w}/hub/operator.toml)
export CELLWATCH_HUB_CLIENT_CONFIG={w}/hub/operator.toml
{shown(BIN / "cellwatch-hub")} nodes
{shown(BIN / "cellwatch-hub")} models
{shown(BIN / "cellwatch-hub")} rollout list

# field samples: node-1 keeps some images of the `client` account (it consented; README
# "Field samples"), sends them to the hub; list them, export them for labelling
{shown(BIN / "cellwatch-hub")} samples list
{shown(BIN / "cellwatch-hub")} samples export {w}/labelling

Logs: {w}/logs/. Stop everything with: make down""",
        flush=True,
    )


def cmd_down(args: argparse.Namespace) -> int:
    return stop_workdir(args.workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/demo.py",
        description="The cellwatch demo: the whole system end to end on this machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="the full demo (make demo)")
    p_up = sub.add_parser("up", help="start broker, hub and one node and return (make up)")
    p_down = sub.add_parser("down", help="stop what `up` (or an interrupted run) started")
    for p in (p_run, p_up, p_down):
        p.add_argument(
            "--workdir",
            type=Path,
            default=DEFAULT_WORKDIR,
            help=f"working directory [default: ./{DEFAULT_WORKDIR}]",
        )
    p_run.add_argument(
        "--quick",
        action="store_true",
        help="the shortened demo the tests run: fewer images, 1 epoch",
    )
    p_run.add_argument(
        "--int8",
        choices=("ptq", "accurate"),
        default=os.environ.get("INT8") or "ptq",
        help="how version 1 is quantised: ptq (plain; fp16 is shipped if the export gate "
        "refuses it) or accurate (NNCF's accuracy-aware search when plain misses the gate: "
        "several minutes more) [default: $INT8, else ptq]",
    )
    p_run.add_argument(
        "--checkpoint",
        default=os.environ.get("CHECKPOINT") or None,
        help="TF-Slim inception_v3.ckpt to start from [default: $CHECKPOINT; "
        "without it: random weights]",
    )
    p_up.add_argument("--port", type=int, default=1883, help="plain MQTT port [default: 1883]")
    p_up.add_argument("--tls-port", type=int, default=8883, help="TLS port [default: 8883]")
    p_up.add_argument(
        "--http-port", type=int, default=8321, help="the hub's fleet page [default: 8321]"
    )
    p_run.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="the hub's fleet page [default: any free port; the URL is printed]",
    )
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run,
        "up": cmd_up,
        "down": cmd_down,
    }
    try:
        return handlers[args.command](args)
    except DemoError as exc:
        console.print(f"[red]✗ {escape(str(exc))}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
