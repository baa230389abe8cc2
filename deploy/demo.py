#!/usr/bin/env python3
"""The one-command demo: the whole cellwatch system, end to end, on this machine.

    python deploy/demo.py run  [--workdir DIR] [--quick] [--checkpoint PATH]   (make demo)
    python deploy/demo.py up   [--workdir DIR] [--port N] [--tls-port M]        (make up)
    python deploy/demo.py down [--workdir DIR]                                  (make down)

`run` makes broker credentials and a signing key with the deploy/ scripts, starts
Mosquitto from the project's mosquitto.conf, a hub and two nodes, trains and exports a
signed model bundle, rolls it out with `cellwatch-hub`, classifies the held-out test
images over MQTT v5, then trains, pushes and rolls out a second version while images
keep flowing, and stops everything it started. Every child process writes its own log
in WORKDIR/logs/, and their PIDs are recorded in WORKDIR/pids so that `down` (or the
next run) can stop whatever an interrupted run left behind. WORKDIR/summary.json holds
the facts of the run for machines (tests/demo/test_demo.py reads it).

`up` starts the broker (ports 1883/8883), the hub and one node with the same
configuration and returns, so the README's mosquitto_pub / mosquitto_sub /
cellwatch-hub examples can be typed by hand; `down` stops them.

Research use only: nothing here is a diagnosis; the demo's images are SYNTHETIC.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import getpass
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, ModuleType
from typing import IO, Any

import paho.mqtt.client as paho
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.mqtt import MqttClient, PublishProps
from cellwatch.shared.schemas import NodeStatus, Result
from cellwatch.shared.settings import MqttSettings, TlsSettings
from cellwatch.shared.topics import Topics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
DEFAULT_WORKDIR = Path("demo-work")
MARKER = ".cellwatch-demo"
NODES = ("node-1", "node-2")
UP_NODES = ("node-1",)
MODEL_NAME = "all-inception-v3"
LABELS = ("normal", "ALL")
SOURCE = "demo-scope"
WAVES = "1,100%"
HOST = "127.0.0.1"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
ROLLOUT_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 120.0
TRAIN_TIMEOUT_S = 1800.0

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
log = logging.getLogger("cellwatch.demo")


class DemoError(Exception):
    """A step failed; the message says what and where to look."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop everything and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Profile:
    """How big a run is: `make demo` or the shortened `--quick` (same code path)."""

    images: int
    epochs: int
    precision: str
    swap_rate: float
    after_swap_s: float


FULL = Profile(images=120, epochs=20, precision="int8", swap_rate=8.0, after_swap_s=5.0)
QUICK = Profile(images=40, epochs=1, precision="int8", swap_rate=6.0, after_swap_s=3.0)


# -- the working directory ------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where everything of one demo lives (all under one directory)."""

    root: Path

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pidfile(self) -> Path:
        return self.root / "pids"

    @property
    def signing(self) -> Path:
        return self.root / "signing"

    @property
    def sign_key(self) -> Path:
        return self.signing / "cellwatch.key"

    @property
    def trusted(self) -> Path:
        return self.root / "trusted-keys"

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def hub_toml(self) -> Path:
        return self.hub / "hub.toml"

    def node(self, node_id: str) -> Path:
        return self.root / node_id

    def node_toml(self, node_id: str) -> Path:
        return self.node(node_id) / "node.toml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def split(self) -> Path:
        return self.root / "split"

    def run_dir(self, tag: str) -> Path:
        return self.root / "runs" / tag

    def bundle(self, tag: str) -> Path:
        return self.root / "bundles" / tag

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def secret(self, user: str) -> Path:
        return self.broker / "secrets" / f"{user}.password"

    @property
    def ca_file(self) -> Path:
        return self.broker / "certs" / "ca.crt"


def shown(path: Path | str) -> str:
    """A path as short as possible for the reader (relative to the current directory)."""
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.relative_to(Path.cwd()))
    return str(p)


# -- narration ----------------------------------------------------------------------


def stage(number: int, total: int, title: str, why: str) -> None:
    console.print()
    console.rule(f"[bold]Step {number}/{total} · {escape(title)}", align="left")
    console.print(f"[dim]{escape(why)}[/dim]")


def doing(text: str) -> None:
    console.print(f"  • {escape(text)}")


def done(text: str) -> None:
    console.print(f"  [green]✓[/green] {escape(text)}")


def command(argv: Sequence[str]) -> None:
    args = [
        Path(a).name if i == 0 else shown(a) if a.startswith("/") else a for i, a in enumerate(argv)
    ]
    console.print(f"    [cyan]$ {escape(' '.join(args))}[/cyan]")


@dataclass
class Timings:
    """Wall-clock seconds of each phase, in order."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - start, 1)


# -- processes ----------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it is gone or a zombie.

    Stored next to each PID so that a PID the kernel reused is never signalled."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass(frozen=True)
class PidRecord:
    pid: int
    ticks: int
    name: str

    def alive(self) -> bool:
        return start_ticks(self.pid) == self.ticks


def read_pidfile(path: Path) -> list[PidRecord]:
    """WORKDIR/pids: one `PID START_TICKS NAME` line per process, in start order."""
    records = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                records.append(PidRecord(int(parts[0]), int(parts[1]), parts[2]))
    return records


def _signal(pid: int, sig: int) -> None:
    """Signal pid's process group if it leads one (our children do), else pid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop_tier(name: str) -> int:
    """Stop order: commands and nodes first (their `offline` status reaches the hub),
    then the hub, the broker last."""
    return {"hub": 1, "mosquitto": 2}.get(name, 0)


def stop_recorded(layout: Layout, *, quiet: bool = False) -> list[str]:
    """Stop the processes WORKDIR/pids lists that still run (in stop_tier order); their
    names."""
    records = [r for r in read_pidfile(layout.pidfile) if r.alive()]
    records.sort(key=lambda r: stop_tier(r.name))
    for r in records:
        if not quiet:
            doing(f"stopping {r.name} (pid {r.pid}) left from an earlier run")
        _signal(r.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while r.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if r.alive():
            _signal(r.pid, signal.SIGKILL)
    layout.pidfile.unlink(missing_ok=True)
    return [r.name for r in records]


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log: Path
    ticks: int
    service: bool
    exit_code: int | None = None
    terminated: bool = False


@dataclass
class Command:
    """A running command whose stdout a thread collects."""

    child: Child
    lines: list[str]
    reader: threading.Thread


class ProcessGroup:
    """Every process the demo starts: own log file, PID recorded, stopped on exit.

    attached=True (`run`): children also get SIGTERM from the kernel if this process
    dies without cleaning up (setpriv --pdeathsig). attached=False (`up`): the
    services outlive this process until `down`.
    """

    def __init__(self, layout: Layout, *, attached: bool) -> None:
        self.layout = layout
        self.attached = attached
        self.children: list[Child] = []
        self.history: list[PidRecord] = []
        """Every process ever started (for summary.json and the tests)."""
        self._lock = threading.Lock()
        self._pdeathsig = attached and setpriv_has_pdeathsig()

    # -- starting ---------------------------------------------------------------------
    def _popen(
        self, name: str, argv: list[str], *, stdout: int | IO[bytes], env: dict[str, str] | None
    ) -> Child:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.layout.logs / f"{name}.log"
        full = ["setpriv", "--pdeathsig", "TERM", "--", *argv] if self._pdeathsig else argv
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout != subprocess.STDOUT else log_file,
                stderr=log_file,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                cwd=self.layout.root,
            )
        child = Child(name, argv, proc, log_path, start_ticks(proc.pid) or 0, service=False)
        with self._lock:
            self.children.append(child)
            self.history.append(PidRecord(proc.pid, child.ticks, name))
            self._write_pidfile()
        return child

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> Child:
        """Start a long-running service; its stdout and stderr go to logs/NAME.log."""
        child = self._popen(name, argv, stdout=subprocess.STDOUT, env=env)
        child.service = True
        return child

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        echo: bool = True,
        show: bool = True,
        env: dict[str, str] | None = None,
    ) -> Command:
        """Start a command whose stdout is collected (and echoed as it comes); stderr
        goes to its log. Finish it with `finish`. show: print the command line first."""
        if show:
            command(argv)
        child = self._popen(name, argv, stdout=subprocess.PIPE, env=env)
        assert child.proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(
            target=self._read_lines, args=(child.proc.stdout, lines, echo), daemon=True
        )
        reader.start()
        return Command(child, lines, reader)

    def finish(self, cmd: Command, *, timeout: float = TRAIN_TIMEOUT_S, check: bool = True) -> str:
        """Wait for a command; its stdout. With check, DemoError (with the end of its
        log) unless it exits 0. Services are checked meanwhile."""
        child = cmd.child
        deadline = time.monotonic() + timeout
        while child.proc.poll() is None:
            if time.monotonic() > deadline:
                self._stop(child)
                raise DemoError(
                    f"{child.name} did not finish within {timeout:g} s; see {shown(child.log)}"
                )
            self.check()
            time.sleep(0.05)
        cmd.reader.join(5)
        self._forget(child)
        if check and child.proc.returncode != 0:
            argv = child.argv
            raise DemoError(
                f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} failed with exit code "
                f"{child.proc.returncode}; the end of {shown(child.log)}:\n" + tail(child.log)
            )
        return "\n".join(cmd.lines)

    def run(
        self,
        name: str,
        argv: list[str],
        *,
        timeout: float = TRAIN_TIMEOUT_S,
        echo: bool = True,
        env: dict[str, str] | None = None,
    ) -> str:
        """Run a command to completion (see spawn and finish); its stdout."""
        return self.finish(self.spawn(name, argv, echo=echo, show=echo, env=env), timeout=timeout)

    @staticmethod
    def _read_lines(stream: IO[bytes], lines: list[str], echo: bool) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if echo and line:
                console.print(f"      {escape(line)}")

    # -- watching ---------------------------------------------------------------------
    def check(self) -> None:
        """DemoError if a service has died."""
        for c in self.children:
            if c.service and c.proc.poll() is not None:
                raise DemoError(
                    f"{c.name} exited with code {c.proc.returncode}; the end of "
                    f"{shown(c.log)}:\n{tail(c.log)}"
                )

    # -- stopping ---------------------------------------------------------------------
    def _terminate(self, child: Child) -> None:
        """SIGTERM, once: a second one could hit a process that already finished its
        graceful shutdown while Python restores default handlers on exit."""
        if child.proc.poll() is None and not child.terminated:
            child.terminated = True
            _signal(child.proc.pid, signal.SIGTERM)

    def _stop(self, child: Child) -> None:
        if child.proc.poll() is None:
            self._terminate(child)
            try:
                child.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %s s: SIGKILL", child.name, STOP_TIMEOUT_S)
                _signal(child.proc.pid, signal.SIGKILL)
                child.proc.wait(STOP_TIMEOUT_S)
        child.exit_code = child.proc.returncode

    def _forget(self, child: Child) -> None:
        child.exit_code = child.proc.returncode
        with self._lock:
            self.children = [c for c in self.children if c is not child]
            self._write_pidfile()

    def stop_all(self) -> dict[str, int | None]:
        """Stop every child, tier by tier (stop_tier; in parallel within a tier).
        Returns each service's exit code (0 = stopped gracefully)."""
        with self._lock:
            children = list(self.children)
        for tier in (0, 1, 2):
            members = [c for c in children if stop_tier(c.name) == tier]
            for c in members:
                self._terminate(c)
            for c in members:
                self._stop(c)
        with self._lock:
            self.children = []
            self.layout.pidfile.unlink(missing_ok=True)
        return {c.name: c.exit_code for c in children if c.service}

    def detach(self) -> None:
        """Leave the services running (for `up`); the pidfile keeps them for `down`."""
        with self._lock:
            self.children = []

    def _write_pidfile(self) -> None:
        text = "".join(f"{c.proc.pid} {c.ticks} {c.name}\n" for c in self.children)
        self.layout.pidfile.write_text(text)


def setpriv_has_pdeathsig() -> bool:
    """util-linux's setpriv can set the parent-death signal (2.33 and later)."""
    if shutil.which("setpriv") is None:
        return False
    proc = subprocess.run(["setpriv", "--help"], capture_output=True, text=True, check=False)
    return "--pdeathsig" in proc.stdout


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])
    return "    (no log)"


def install_signal_handlers() -> None:
    def _raise(signum: int, frame: FrameType | None) -> None:
        # A second signal while cleaning up is ignored: cleanup must finish.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)


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
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if found is None:
        raise DemoError(
            "Mosquitto is not installed: run `make demo` as root (it installs it with "
            "apt-get), or `sudo apt-get install mosquitto mosquitto-clients`"
        )
    return found


def _load_broker_conf() -> ModuleType:
    """deploy/broker_conf.py as a module (deploy/ is not a package)."""
    path = DEPLOY / "broker_conf.py"
    spec = importlib.util.spec_from_file_location("cellwatch_deploy_broker_conf", path)
    if spec is None or spec.loader is None:
        raise DemoError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, child: Child, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child.proc.poll() is not None:
            raise DemoError(
                f"{child.name} exited with code {child.proc.returncode} on start; the end "
                f"of {shown(child.log)}:\n{tail(child.log)}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DemoError(f"{child.name} is not listening on port {port}") from None
            time.sleep(0.05)


# -- the broker -------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerInfo:
    port: int
    tls_port: int


def make_credentials(layout: Layout, nodes: Sequence[str]) -> None:
    """Users, ACL and test certificates, made with the deploy/ scripts."""
    layout.broker.mkdir(parents=True, exist_ok=True)
    for script, args in (
        ("mkusers.sh", [str(layout.broker), *nodes]),
        ("mkacl.sh", [str(layout.broker), *nodes]),
        ("mkcerts.sh", [str(layout.broker), "localhost"]),
    ):
        argv = ["bash", str(DEPLOY / script), *args]
        command([f"deploy/{script}", *args])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise DemoError(f"deploy/{script} failed:\n{proc.stdout}{proc.stderr}")
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
    broker_conf = _load_broker_conf()
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
    """A node on the TLS listener, with a bundle store for hub-driven updates."""
    path = layout.node_toml(node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = f"bundle = {toml_str(bundle)}\n" if bundle is not None else ""
    path.write_text(f"""\
# cellwatch demo node (deploy/node.example.toml documents every setting)
node_id = {toml_str(node_id)}
tags = ["demo"]
telemetry_interval_s = 5.0

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


def write_hub_toml(layout: Layout, broker: BrokerInfo) -> Path:
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
""")
    return path


# -- the demo's MQTT client ---------------------------------------------------------------


@dataclass
class Request:
    key: bytes
    image: Path
    truth: str | None
    sent_at: float
    result: Result | None = None
    answered_at: float | None = None
    refused: bool = False

    @property
    def latency_ms(self) -> float | None:
        if self.answered_at is None:
            return None
        return (self.answered_at - self.sent_at) * 1000.0

    @property
    def failed(self) -> bool:
        return self.refused or (self.result is not None and self.result.status != "ok")


def truth_of(image: Path) -> str | None:
    """ALL-IDB names: `_1` is an ALL blast, `_0` a normal lymphocyte."""
    suffix = image.stem.rsplit("_", 1)[-1]
    return {"0": LABELS[0], "1": LABELS[1]}.get(suffix)


class DemoClient:
    """A lab client: logs in as `client`, publishes images with a Response Topic and
    Correlation Data (MQTT v5) and collects the Results; also follows node statuses."""

    def __init__(self, settings: MqttSettings, topics: Topics) -> None:
        self.topics = topics
        self.reply_topic = topics.replies("client", f"demo-{uuid.uuid4().hex[:8]}")
        self._status_filter = topics.node_filter("status")
        self._cond = threading.Condition()
        self.requests: dict[bytes, Request] = {}
        self.statuses: dict[str, NodeStatus] = {}
        self.mqtt = MqttClient(
            settings,
            client_id=f"cellwatch-demo-{uuid.uuid4().hex[:8]}",
            clean_start=True,
            subscriptions=[(self.reply_topic, 1), (self._status_filter, 1)],
        )
        self.mqtt.set_message_handler(self._on_message)

    def connect(self) -> None:
        self.mqtt.connect()
        # The PUBACK of a publish nobody may make means the SUBSCRIBEs before it are active.
        self.mqtt.publish_wait(f"{self.topics.prefix}-demo/sync", b"", qos=1)

    def close(self) -> None:
        self.mqtt.disconnect()

    # network thread
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        if msg.topic == self.reply_topic:
            corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
            try:
                result = Result.model_validate_json(msg.payload)
            except ValidationError:
                log.warning("ignoring a malformed Result on %s", msg.topic)
                return
            with self._cond:
                req = self.requests.get(bytes(corr or b""))
                if req is not None and req.result is None:
                    req.result, req.answered_at = result, now
                self._cond.notify_all()
        elif msg.payload:
            try:
                status = NodeStatus.model_validate_json(msg.payload)
            except ValidationError:
                return
            with self._cond:
                self.statuses[status.node_id] = status
                self._cond.notify_all()

    def send(self, image: Path, key: str) -> Request:
        """Publish one image (QoS 1); the Result arrives on our Response Topic."""
        req = Request(key.encode(), image, truth_of(image), time.monotonic())
        with self._cond:
            self.requests[req.key] = req
        props = PublishProps(
            response_topic=self.reply_topic,
            correlation_data=req.key,
            content_type="image/tiff" if image.suffix.lower() in (".tif", ".tiff") else None,
            user=[("image_id", image.stem)],
        )

        def _done(ok: bool) -> None:
            if not ok:
                with self._cond:
                    req.refused = True
                    self._cond.notify_all()

        self.mqtt.publish(
            self.topics.images(SOURCE), image.read_bytes(), qos=1, props=props, on_done=_done
        )
        return req

    def wait(
        self, predicate: Callable[[], bool], timeout: float, check: Callable[[], None]
    ) -> bool:
        """Wait until predicate() (called under the lock) holds; check() runs every second."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if self._cond.wait_for(
                    predicate, timeout=min(1.0, max(0.0, deadline - time.monotonic()))
                ):
                    return True
            check()
            if time.monotonic() >= deadline:
                return False

    def pending(self, reqs: Sequence[Request]) -> int:
        with self._cond:
            return sum(1 for r in reqs if r.result is None and not r.refused)

    def serving(self, node_id: str) -> str | None:
        """The model version node_id says it serves (None: no model or offline)."""
        with self._cond:
            s = self.statuses.get(node_id)
        if s is None or s.state != "online" or s.model is None:
            return None
        return s.model.version


# -- the demo ---------------------------------------------------------------------------


@dataclass
class Trained:
    tag: str
    version: str
    run: Path
    bundle: Path
    metrics: dict[str, Any]
    """The test split's metrics from `cellwatch-train evaluate` (TensorFlow)."""
    agreement: float | None
    """Share of test images where the exported IR's top class equals TensorFlow's."""


class Hub:
    """The hub process and the operator's `cellwatch-hub` commands against it."""

    def __init__(self, group: ProcessGroup, layout: Layout, broker: BrokerInfo) -> None:
        self.group = group
        self.layout = layout
        self.exe = tool("cellwatch-hub")
        self.operator_toml = write_operator_toml(layout, broker)

    def op(self, *args: str) -> list[str]:
        """An operator command (user `operator`, connection from operator.toml)."""
        return [self.exe, *args, "--config", str(self.operator_toml)]

    def serve(self) -> Child:
        argv = [self.exe, "serve", "--config", str(self.layout.hub_toml)]
        command(argv)
        return self.group.start("hub", argv)

    def nodes(self) -> dict[str, Any]:
        """`cellwatch-hub nodes --json`: node id -> what the hub knows of it."""
        out = self.group.run("hub-nodes", self.op("nodes", "--json"), echo=False, timeout=60)
        return {n["node_id"]: n for n in json.loads(out)["nodes"]}

    def wait_for(
        self, what: str, ready: Callable[[dict[str, Any]], bool], timeout: float = START_TIMEOUT_S
    ) -> None:
        """Poll `nodes --json` until ready(nodes) (the hub answers the API, sees the nodes)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready(self.nodes()):
                    return
            except DemoError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the hub did not report {what} within {timeout:g} s; see "
                    f"{shown(self.layout.logs / 'hub.log')}"
                )
            time.sleep(0.5)

    def push(self, bundle: Path) -> None:
        self.group.run("hub-push", self.op("push", str(bundle)), timeout=600)

    def rollout(self, version: str, waves: str) -> str:
        """`rollout start`; prints it, returns the rollout id."""
        argv = self.op("rollout", "start", MODEL_NAME, version, "--waves", waves, "--json")
        command(argv[:-3])
        info = json.loads(self.group.run("hub-rollout", argv, echo=False, timeout=60))
        done(
            f"rollout {info['rollout_id']}: {MODEL_NAME} {version} to {info['target']} "
            f"({len(info['targets'])} nodes), waves {waves}"
        )
        rid: str = info["rollout_id"]
        return rid

    def watch(self, rollout_id: str) -> Command:
        """`rollout status ID --watch`, echoed as it goes; exits 0 once completed."""
        argv = self.op("rollout", "status", rollout_id, "--watch", "--interval", "0.5")
        command(argv[:-2])
        return self.group.spawn("hub-watch", argv, show=False)


class Traffic:
    """Publishes images at a steady rate on a background thread (step 6)."""

    def __init__(
        self, client: DemoClient, images: Sequence[Path], rate: float, max_outstanding: int = 40
    ) -> None:
        self.client = client
        self.images = list(images)
        self.period = 1.0 / rate
        self.max_outstanding = max_outstanding
        self.sent: list[Request] = []
        self.error: str | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.stopped_at = time.monotonic()

    def _run(self) -> None:
        i, next_at = 0, time.monotonic()
        while not self._stop.is_set():
            if self.client.pending(self.sent[-self.max_outstanding * 4 :]) < self.max_outstanding:
                try:
                    self.sent.append(
                        self.client.send(self.images[i % len(self.images)], f"swap-{i}")
                    )
                except (CellwatchError, OSError) as exc:
                    self.error = str(exc)
                    return
                i += 1
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def tally(reqs: Sequence[Request]) -> dict[str, Any]:
    """Counts over requests: answered, failed (error Result or refused publish), missing."""
    answered = [r for r in reqs if r.result is not None]
    by_version: dict[str, int] = {}
    by_node: dict[str, int] = {}
    for r in answered:
        assert r.result is not None
        if r.result.model is not None:
            by_version[r.result.model.version] = by_version.get(r.result.model.version, 0) + 1
        by_node[r.result.node_id] = by_node.get(r.result.node_id, 0) + 1
    errors = [
        f"{r.image.name}: {r.result.error.code} ({r.result.error.message})"
        for r in answered
        if r.result is not None and r.result.error is not None
    ] + [f"{r.image.name}: publish refused by the broker" for r in reqs if r.refused]
    return {
        "sent": len(reqs),
        "answered": len(answered),
        "failed": sum(1 for r in reqs if r.failed),
        "missing": sum(1 for r in reqs if r.result is None and not r.refused),
        "by_version": by_version,
        "by_node": by_node,
        "errors": errors[:10],
    }


class Demo:
    """`run`: the seven steps in order; everything started is stopped at the end."""

    STEPS = 7

    def __init__(
        self, layout: Layout, profile: Profile, checkpoint: Path | None, *, attached: bool = True
    ) -> None:
        self.layout = layout
        self.profile = profile
        self.checkpoint = checkpoint
        self.group = ProcessGroup(layout, attached=attached)
        self.broker: BrokerInfo | None = None
        self.timings = Timings()
        self.topics = Topics()
        self._client: DemoClient | None = None
        self._hub: Hub | None = None
        self.summary: dict[str, Any] = {
            "ok": False,
            "error": None,
            "quick": profile is QUICK,
            "workdir": str(layout.root),
            "started_at": datetime.now(UTC).isoformat(),
            "nodes": list(NODES),
            "model": MODEL_NAME,
            "checkpoint": str(checkpoint) if checkpoint else None,
        }

    @property
    def client(self) -> DemoClient:
        assert self._client is not None
        return self._client

    @property
    def hub(self) -> Hub:
        assert self._hub is not None
        return self._hub

    def make_data(self) -> None:
        """A SYNTHETIC data set and its train/val/test split, with cellwatch-train."""
        data, split = self.layout.data, self.layout.split
        synth = cw("train", "synth", data, "--count", self.profile.images, "--force")
        self.group.run("train-synth", synth)
        self.group.run("train-prepare", cw("train", "prepare", data, "--out", split, "--force"))

    def train(self, tag: str, version: str, epochs: int) -> Trained:
        """fit (bottleneck) -> evaluate -> export a signed bundle, with cellwatch-train."""
        run, bundle = self.layout.run_dir(tag), self.layout.bundle(tag)
        run.parent.mkdir(parents=True, exist_ok=True)
        bundle.parent.mkdir(parents=True, exist_ok=True)
        base = ["--checkpoint", self.checkpoint] if self.checkpoint is not None else []
        env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
        doing(
            f"training {MODEL_NAME} {version}: {epochs} epoch(s) of a new 2-class head on "
            "Inception V3 features (bottleneck mode: the base network runs once per image)"
        )
        fit = cw("train", "fit", self.layout.split, "--out", run, "--epochs", epochs, *base)
        self.group.run(f"train-fit-{tag}", [*fit, "--mode", "bottleneck", "--force"], env=env)
        doing("evaluating on the held-out test images (never seen in training)")
        self.group.run(f"train-evaluate-{tag}", cw("train", "evaluate", run), env=env)
        doing(f"exporting: frozen graph -> OpenVINO IR ({self.profile.precision}) -> signed bundle")
        export = cw("train", "export", run, "--out", bundle, "--name", MODEL_NAME)
        export += ["--version", version, "--precision", self.profile.precision]
        export += ["--sign-key", str(self.layout.sign_key), "--force"]
        self.group.run(f"train-export-{tag}", export, env=env)
        metrics: dict[str, Any] = json.loads((run / "eval-test" / "metrics.json").read_text())
        manifest = json.loads((bundle / "manifest.json").read_text())
        agreement = manifest.get("metrics", {}).get("ir_agreement", {}).get("top1_agreement")
        return Trained(tag, version, run, bundle, metrics, agreement)

    # -- the steps ----------------------------------------------------------------------
    def run(self) -> None:
        with self.timings.phase("1 broker, credentials, signing key"):
            self.step_broker()
        with self.timings.phase("2 hub and two nodes"):
            self.step_services()
        with self.timings.phase("3 train, evaluate, export v1"):
            v1 = self.step_train_v1()
        with self.timings.phase("4 push and roll out v1"):
            self.step_rollout_v1(v1)
        with self.timings.phase("5 classify the test images"):
            test_images = self.step_classify(v1)
        with self.timings.phase("6a train, evaluate, export v2"):
            stage(
                6,
                self.STEPS,
                "A second version, rolled out while images keep flowing",
                "Training a model is never done once. The new version goes out to the nodes "
                "while a lab client keeps sending images: each node downloads, verifies and "
                "self-tests it beside the old one and then swaps atomically, so no request "
                "fails and results switch from the old version to the new one.",
            )
            v2 = self.train("v2", "1.1.0", self.profile.epochs + 1)
            self.report_metrics(v2)
        with self.timings.phase("6b roll out v2 under load"):
            self.step_swap(v1, v2, test_images)
        self.summary["ok"] = True

    def step_broker(self) -> None:
        stage(
            1,
            self.STEPS,
            "Broker: users, ACL, TLS certificates, signing key",
            "Every part talks through an MQTT broker (Mosquitto). Nobody may connect without "
            "a password, and the ACL limits what each user may read and write. Model bundles "
            "are signed; hub and nodes accept only bundles signed by a trusted key.",
        )
        make_credentials(self.layout, NODES)
        make_signing_key(self.group, self.layout)
        broker = start_broker(self.group, self.layout, free_port(), free_port())
        self.broker = broker
        self._client = DemoClient(mqtt_settings(self.layout, broker, "client"), self.topics)
        self.client.connect()

    def step_services(self) -> None:
        stage(
            2,
            self.STEPS,
            "The hub and two nodes",
            "The hub keeps the model registry and moves nodes from one version to the next. "
            "Each node classifies images with OpenVINO. Both nodes join the shared "
            "subscription $share/cellwatch-nodes/cellwatch/images/+, so the broker spreads "
            "the images over them. They start without a model and get one in step 4.",
        )
        assert self.broker is not None
        write_hub_toml(self.layout, self.broker)
        self._hub = Hub(self.group, self.layout, self.broker)
        self.hub.serve()
        self.hub.wait_for("that it is ready", lambda nodes: True)
        done(
            f"hub running (config {shown(self.layout.hub_toml)}); it answers the operator's "
            f"commands (user operator, {shown(self.hub.operator_toml)})"
        )
        started = {}
        for node_id in NODES:
            toml = write_node_toml(self.layout, node_id, self.broker)
            argv = cw("node", "run", "--config", toml)
            command(argv)
            started[node_id] = datetime.now(UTC).replace(microsecond=0)
            self.group.start(node_id, argv)

        def online() -> bool:
            st = self.client.statuses
            return all(
                n in st and st[n].state == "online" and st[n].since >= started[n] for n in NODES
            )

        if not self.client.wait(online, START_TIMEOUT_S, self.group.check):
            raise DemoError(f"the nodes did not come online; see {shown(self.layout.logs)}/")
        done(f"{' and '.join(NODES)} online over TLS (port {self.broker.tls_port}), no model yet")
        self.hub.wait_for(
            "both nodes",
            lambda nodes: all(n in nodes and nodes[n]["state"] == "online" for n in NODES),
        )
        doing("what the hub knows about the fleet:")
        self.group.run("hub-nodes", self.hub.op("nodes"), timeout=60)

    def step_train_v1(self) -> Trained:
        stage(
            3,
            self.STEPS,
            "Train, evaluate and export version 1",
            "A SYNTHETIC data set imitates ALL-IDB blood-smear crops (`_1` = ALL blast, "
            "`_0` = normal). It is split by source image into train, validation and test; "
            "a 2-class head is trained on TF-Slim Inception V3 features, evaluated on the "
            "test split, converted to OpenVINO and signed.",
        )
        if self.checkpoint is not None:
            doing(f"starting from the ImageNet weights in {self.checkpoint}")
        else:
            console.print(
                "  [yellow]![/yellow] no CHECKPOINT given: Inception V3 starts from "
                "RANDOM weights, so accuracy only shows that the plumbing works. "
                "Use `make demo CHECKPOINT=path/to/inception_v3.ckpt` for real "
                "ImageNet features (see the README)."
            )
        self.make_data()
        v1 = self.train("v1", "1.0.0", self.profile.epochs)
        self.report_metrics(v1)
        return v1

    def report_metrics(self, t: Trained) -> None:
        m = t.metrics
        done(
            f"{MODEL_NAME} {t.version}: test accuracy {m['accuracy']:.2f}, sensitivity "
            f"{m['recall']:.2f}, specificity {m['specificity']:.2f} on {m['n']} images; "
            f"bundle {shown(t.bundle)}"
        )

    def step_rollout_v1(self, v1: Trained) -> None:
        stage(
            4,
            self.STEPS,
            "Push version 1 to the hub and roll it out",
            "`cellwatch-hub push` checks the bundle's signature and stores it; `rollout "
            "start` tells the nodes, wave by wave, which version they should serve. Each node "
            "downloads the bundle from the hub in chunks over MQTT, verifies every hash and "
            "the signature, compiles it, runs its self-test and only then serves it.",
        )
        self.hub.push(v1.bundle)
        t0 = time.monotonic()
        self.roll_out(v1.version, None)
        self.summary["rollout_v1_s"] = round(time.monotonic() - t0, 1)

    def roll_out(self, version: str, traffic: Traffic | None) -> float:
        """Start a rollout (a canary node first, then the rest), follow it until every
        node serves version and the hub calls it completed; when the last node switched."""
        rollout_id = self.hub.rollout(version, WAVES)
        watch = self.hub.watch(rollout_id)
        switched_at = self.follow_rollout(version, traffic)
        self.group.finish(watch, timeout=ROLLOUT_TIMEOUT_S)
        return switched_at

    def follow_rollout(self, version: str, traffic: Traffic | None) -> float:
        """Print each node's switch (and the traffic's counts) until all serve version.
        Returns the monotonic time at which the last node switched."""
        start = time.monotonic()
        seen = {n: self.client.serving(n) for n in NODES}
        last_print = start
        while True:
            self.group.check()
            now = time.monotonic()
            for n in NODES:
                v = self.client.serving(n)
                if v != seen[n]:
                    seen[n] = v
                    done(f"{n} now serves {MODEL_NAME} {v} ({now - start:.1f} s after the start)")
            if all(v == version for v in seen.values()):
                return now
            if traffic is not None and now - last_print >= 3.0:
                last_print = now
                t = tally(list(traffic.sent))
                doing(
                    f"images sent {t['sent']}, answered {t['answered']} "
                    f"{self.versions_text(t)}, failed {t['failed']}"
                )
            if now - start > ROLLOUT_TIMEOUT_S:
                state = ", ".join(f"{n}: {v or 'no model'}" for n, v in seen.items())
                raise DemoError(
                    f"the nodes did not all serve {version} within "
                    f"{ROLLOUT_TIMEOUT_S:g} s ({state}); see "
                    f"{shown(self.layout.logs)}/"
                )
            time.sleep(0.2)

    @staticmethod
    def versions_text(t: dict[str, Any]) -> str:
        parts = [f"{v}: {n}" for v, n in sorted(t["by_version"].items())]
        return f"({', '.join(parts)})" if parts else ""

    def test_images(self) -> list[Path]:
        from cellwatch.training.split import load_split

        split = load_split(self.layout.split)
        return [split.root / e.path for e in split.entries("test")]

    def step_classify(self, v1: Trained) -> list[Path]:
        stage(
            5,
            self.STEPS,
            "Classify the held-out test images over MQTT",
            "Like a microscope PC would, the demo publishes each test image to "
            f"cellwatch/images/{SOURCE} (MQTT v5, QoS 1) with a Response Topic under "
            "cellwatch/replies/client/ and Correlation Data; whichever node takes the image "
            "answers there with a Result. Latency is measured by the client, publish to result.",
        )
        images = self.test_images()
        reqs: list[Request] = []
        window = len(NODES)
        for i, image in enumerate(images):
            self.client.wait(
                lambda: self.client.pending(reqs) < window, DRAIN_TIMEOUT_S, self.group.check
            )
            reqs.append(self.client.send(image, f"test-{i}"))
        if not self.client.wait(
            lambda: self.client.pending(reqs) == 0, DRAIN_TIMEOUT_S, self.group.check
        ):
            raise DemoError(f"{self.client.pending(reqs)} test images got no answer")
        table = Table(title="Results (SYNTHETIC images; research use only, not a diagnosis)")
        for col in ("image", "truth", "label", "confidence", "node", "model", "latency ms"):
            table.add_column(
                col, justify="right" if col in ("confidence", "latency ms") else "left"
            )
        correct = 0
        for r in reqs:
            res = r.result
            assert res is not None
            if res.status != "ok":
                table.add_row(
                    r.image.name,
                    r.truth or "?",
                    f"[red]{res.error.code if res.error else 'error'}",
                    "",
                    res.node_id,
                    "",
                    f"{r.latency_ms or 0:.0f}",
                )
                continue
            hit = res.label == r.truth
            correct += hit
            table.add_row(
                r.image.name,
                r.truth or "?",
                f"[{'green' if hit else 'red'}]{res.label}",
                f"{res.confidence or 0:.3f}{' (low)' if res.low_confidence else ''}",
                res.node_id,
                res.model.version if res.model else "",
                f"{r.latency_ms or 0:.0f}",
            )
        console.print(table)
        t = tally(reqs)
        accuracy = correct / len(reqs) if reqs else 0.0
        done(
            f"accuracy {correct}/{len(reqs)} = {accuracy:.2f}; answers from "
            f"{', '.join(sorted(t['by_node']))}"
        )
        if v1.agreement is not None and abs(accuracy - v1.metrics["accuracy"]) > 1e-9:
            doing(
                f"TensorFlow's evaluation in step 3 said {v1.metrics['accuracy']:.2f}: the "
                f"{self.profile.precision} OpenVINO model the nodes run gives the same top class "
                f"on {v1.agreement:.0%} of these images (quantisation moved the others)"
            )
        if t["failed"]:
            raise DemoError(f"{t['failed']} test images failed: {t['errors']}")
        self.summary["classify"] = {
            **t,
            "accuracy": accuracy,
            "latency_ms_median": statistics.median([r.latency_ms or 0 for r in reqs] or [0.0]),
        }
        return images

    def step_swap(self, v1: Trained, v2: Trained, test_images: list[Path]) -> None:
        traffic = Traffic(self.client, test_images, self.profile.swap_rate)
        doing(f"a lab client starts sending {self.profile.swap_rate:g} images per second")
        traffic.start()
        try:
            time.sleep(2.0)
            self.hub.push(v2.bundle)
            rollout_at = time.monotonic()
            switched_at = self.roll_out(v2.version, traffic)
            doing(f"both nodes serve {v2.version}; {self.profile.after_swap_s:g} s more of images")
            time.sleep(self.profile.after_swap_s)
        finally:
            traffic.stop()
        if traffic.error:
            raise DemoError(f"the lab client could not publish: {traffic.error}")
        reqs = list(traffic.sent)
        doing("waiting for the last answers")
        self.client.wait(lambda: self.client.pending(reqs) == 0, DRAIN_TIMEOUT_S, self.group.check)
        t = tally(reqs)
        answered = sorted(
            (r for r in reqs if r.result is not None and r.result.model),
            key=lambda r: r.answered_at or 0.0,
        )
        first_v2 = next(
            (
                r
                for r in answered
                if r.result and r.result.model and r.result.model.version == v2.version
            ),
            None,
        )
        last_v1 = next(
            (
                r
                for r in reversed(answered)
                if r.result and r.result.model and r.result.model.version == v1.version
            ),
            None,
        )
        during = sum(1 for r in answered if rollout_at <= (r.answered_at or 0) <= switched_at)

        def rel(r: Request | None) -> float | None:
            return round((r.answered_at or 0) - rollout_at, 2) if r else None

        done(
            f"{t['sent']} images sent during the swap, {t['answered']} answered "
            f"{self.versions_text(t)}, {t['failed']} failed, {t['missing']} missing"
        )
        if first_v2 and last_v1:
            done(
                f"first answer from {v2.version}: {rel(first_v2):+.1f} s after `rollout start` "
                f"({first_v2.result.node_id if first_v2.result else ''}); last answer from "
                f"{v1.version}: {rel(last_v1):+.1f} s"
            )
        last = answered[-1].result if answered else None
        self.summary["swap"] = {
            **t,
            "rate_per_s": self.profile.swap_rate,
            "answered_during_rollout": during,
            "traffic_started_s": round(traffic.started_at - rollout_at, 2),
            "traffic_stopped_s": round(traffic.stopped_at - rollout_at, 2),
            "all_nodes_switched_s": round(switched_at - rollout_at, 2),
            "first_v2_answer_s": rel(first_v2),
            "last_v1_answer_s": rel(last_v1),
            "last_answer_version": last.model.version if last and last.model else None,
            "flowing_during_rollout": traffic.started_at < rollout_at
            and traffic.stopped_at > switched_at
            and during > 0,
        }
        self.summary["versions"] = {"v1": v1.version, "v2": v2.version}
        if t["failed"] or t["missing"]:
            raise DemoError(
                f"{t['failed']} failed and {t['missing']} missing answers during "
                f"the swap: {t['errors']}"
            )

    # -- the end --------------------------------------------------------------------------
    def paths(self) -> dict[str, list[str]]:
        runs = sorted(self.layout.root.glob("runs/*"))
        return {
            "plots": [str(p) for r in runs for p in sorted(r.rglob("*.png"))],
            "metrics": [str(p) for r in runs for p in sorted(r.glob("eval-*/metrics.json"))],
            "bundles": [str(p) for p in sorted(self.layout.root.glob("bundles/*"))],
            "logs": [str(p) for p in sorted(self.layout.logs.glob("*.log"))],
        }

    def finish(self) -> None:
        """Step 7 (also after a failure): say where things are, stop everything, write
        summary.json."""
        if self.summary["ok"]:
            stage(
                7,
                self.STEPS,
                "Where everything is, and cleaning up",
                "Everything the demo made stays in the working directory; every process it "
                "started is stopped now.",
            )
        paths = self.paths()
        if self.summary["ok"]:
            runs = sorted({str(Path(p).parent) for p in paths["metrics"]})
            for label, values in (
                ("plots", [shown(p) for p in paths["plots"]]),
                ("metrics", [shown(p) for p in paths["metrics"]] or ["-"]),
                ("bundles", [shown(p) + "/" for p in paths["bundles"]]),
                ("runs", [shown(Path(r).parent) + "/" for r in runs]),
                ("logs", [shown(self.layout.logs) + "/ (one file per process)"]),
                ("summary", [shown(self.layout.summary)]),
            ):
                console.print(
                    f"  [bold]{label:<8}[/bold] " + "\n           ".join(escape(v) for v in values)
                )
        if self._client is not None:
            with contextlib.suppress(CellwatchError):
                self.client.close()
        running = sorted(
            (c.name for c in self.group.children if c.service and c.proc.poll() is None),
            key=stop_tier,
        )
        if running:
            doing(f"stopping {', '.join(running)}")
        with self.timings.phase("7 stop everything"):
            codes = self.group.stop_all()
        stopped = {name: codes.get(name) for name in running}
        if running:
            if all(code == 0 for code in stopped.values()):
                done(f"stopped {', '.join(running)}: each exited cleanly (code 0)")
            else:
                console.print(f"  [yellow]![/yellow] exit codes: {stopped}")
        if not self.summary["ok"]:
            console.print(
                f"  Logs of every process: {escape(shown(self.layout.logs))}/; "
                f"the facts of this run: {escape(shown(self.layout.summary))}"
            )
        self.summary.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "phases_s": self.timings.phases,
                "total_s": round(sum(self.timings.phases.values()), 1),
                "exit_codes": codes,
                "processes": [
                    {"name": r.name, "pid": r.pid, "ticks": r.ticks} for r in self.group.history
                ],
                "nodes_answered": sorted(
                    set(self.summary.get("classify", {}).get("by_node", {}))
                    | set(self.summary.get("swap", {}).get("by_node", {}))
                ),
                "versions_seen": sorted(
                    set(self.summary.get("classify", {}).get("by_version", {}))
                    | set(self.summary.get("swap", {}).get("by_version", {}))
                ),
                "paths": paths,
            }
        )
        self.layout.summary.write_text(json.dumps(self.summary, indent=2) + "\n")
        table = Table(title="Phase timings", show_header=True)
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        for name, secs in self.timings.phases.items():
            table.add_row(name, f"{secs:.1f}")
        table.add_row("[bold]total", f"[bold]{self.summary['total_s']:.1f}")
        console.print(table)


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
    demo = Demo(layout, profile, checkpoint)
    atexit.register(demo.group.stop_all)
    install_signal_handlers()
    code = 1
    try:
        demo.run()
        code = 0
    except Interrupted as exc:
        console.print(f"\n[yellow]interrupted ({exc}): stopping everything the demo started")
        demo.summary["error"] = f"interrupted by {exc}"
        code = 130
    except (DemoError, CellwatchError) as exc:
        console.print(f"\n[red]✗ {escape(str(exc))}")
        demo.summary["error"] = str(exc)
    finally:
        demo.finish()
    if code == 0:
        console.print(
            f"\n[bold green]Demo finished[/bold green] in {demo.summary['total_s']:.0f} s. "
            "Next: `make up` to try it by hand, `make test` for the test suite."
        )
    return code


def cmd_up(args: argparse.Namespace) -> int:
    """Broker on fixed ports, hub, one node: for typing the README's examples by hand."""
    layout = prepare_workdir(args.workdir, fresh=False)
    setup_logging(layout)
    for port in (args.port, args.tls_port):
        if not port_free(port):
            raise DemoError(
                f"port {port} is already in use (another Mosquitto? `sudo systemctl stop "
                f"mosquitto`, `make down`, or choose others: python deploy/demo.py up --port N "
                "--tls-port M)"
            )
    console.print(f"Working directory: [bold]{escape(shown(layout.root))}[/bold]")
    demo = Demo(layout, QUICK, None, attached=False)
    install_signal_handlers()
    try:
        make_credentials(layout, UP_NODES)
        make_signing_key(demo.group, layout)
        # A fresh broker database: sessions of an earlier run's nodes (node-2) would
        # otherwise keep their share of the shared subscription's images.
        shutil.rmtree(layout.broker / "data", ignore_errors=True)
        broker = start_broker(demo.group, layout, args.port, args.tls_port)
        demo.broker = broker
        demo._client = DemoClient(mqtt_settings(layout, broker, "client"), demo.topics)
        demo.client.connect()
        write_hub_toml(layout, broker)
        demo._hub = Hub(demo.group, layout, broker)
        demo.hub.serve()
        demo.hub.wait_for("that it is ready", lambda nodes: True)
        done("hub running")
        bundles = sorted(layout.root.glob("bundles/*/manifest.json"))
        if not bundles:
            doing("no bundle from an earlier `make demo` here: training a quick one (1 epoch)")
            demo.make_data()
            demo.train("v1", "1.0.0", QUICK.epochs)
            bundles = sorted(layout.root.glob("bundles/*/manifest.json"))
        for manifest in bundles:
            demo.hub.push(manifest.parent)
        latest = bundles[-1].parent
        toml = write_node_toml(layout, UP_NODES[0], broker, bundle=latest)
        argv = cw("node", "run", "--config", toml)
        command(argv)
        since = datetime.now(UTC).replace(microsecond=0)
        demo.group.start(UP_NODES[0], argv)
        node = UP_NODES[0]

        def online() -> bool:
            st = demo.client.statuses.get(node)
            return st is not None and st.state == "online" and st.since >= since

        if not demo.client.wait(online, START_TIMEOUT_S, demo.group.check):
            raise DemoError(f"{node} did not come online; see {shown(layout.logs)}/")
        done(f"{node} online, serving {demo.client.serving(node) or 'no model'}")
        demo.client.close()
        print_cheatsheet(layout, broker)
        demo.group.detach()
        return 0
    except BaseException:
        console.print("[red]✗ `up` failed: stopping what it started")
        demo.group.stop_all()
        raise


def print_cheatsheet(layout: Layout, broker: BrokerInfo) -> None:
    w = shown(layout.root)
    images = sorted(layout.data.glob("*_1.*")) or sorted(layout.data.glob("*"))
    image = shown(images[0]) if images else "smear.jpg"
    pw = f'"$(cat {shown(layout.secret("client"))})"'
    console.print()
    console.rule("[bold]Running: broker, hub and node-1. Try it by hand", align="left")
    print(
        f"""\
Broker: {HOST}:{broker.port} (plain, loopback) and localhost:{broker.tls_port} (TLS, CA \
{w}/broker/certs/ca.crt); passwords in {w}/broker/secrets/

# classify an image (MQTT v5 request/response)
mosquitto_sub -V mqttv5 -p {broker.port} -u client -P {pw} -t 'cellwatch/replies/client/#' -C 1 &
mosquitto_pub -V mqttv5 -p {broker.port} -u client -P {pw} -q 1 \\
  -t cellwatch/images/scope-1 -f {image} \\
  -D publish response-topic cellwatch/replies/client/me -D publish correlation-data req-1

# the operator's view (user operator; connection in {w}/hub/operator.toml)
export CELLWATCH_HUB_CLIENT_CONFIG={w}/hub/operator.toml
{shown(BIN / "cellwatch-hub")} nodes
{shown(BIN / "cellwatch-hub")} models
{shown(BIN / "cellwatch-hub")} rollout list

Logs: {w}/logs/. Stop everything with: make down""",
        flush=True,
    )


def cmd_down(args: argparse.Namespace) -> int:
    layout = Layout(args.workdir.expanduser().resolve())
    names = stop_recorded(layout, quiet=True)
    if names:
        done(f"stopped {', '.join(names)}")
    else:
        done(f"nothing from {shown(layout.root)} was running")
    return 0


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
        "--checkpoint",
        default=os.environ.get("CHECKPOINT") or None,
        help="TF-Slim inception_v3.ckpt to start from [default: $CHECKPOINT; "
        "without it: random weights]",
    )
    p_up.add_argument("--port", type=int, default=1883, help="plain MQTT port [default: 1883]")
    p_up.add_argument("--tls-port", type=int, default=8883, help="TLS port [default: 8883]")
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
