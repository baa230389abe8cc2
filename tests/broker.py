"""A real Mosquitto broker for tests, running the project's own mosquitto.conf.

`Broker.create(dir)` renders mosquitto.conf into dir with two free ports
(deploy/broker_conf.py), creates users, ACL and certificates with the deploy/
scripts and starts `mosquitto -c dir/mosquitto.conf`. The `broker` fixture in
tests/conftest.py wraps it; `Inbox` collects messages with event-based waits.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from pydantic import SecretStr

from cellwatch.shared.errors import MqttError
from cellwatch.shared.mqtt import Message, MqttClient
from cellwatch.shared.settings import MqttSettings, TlsSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MOSQUITTO_CONF = REPO / "mosquitto.conf"
DEFAULT_NODES = ("node-1", "node-2", "node-3")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
WAIT_S = 10.0
"""Default bound of every wait for a message or an event (generous: CI machines are slow)."""


def _load_broker_conf() -> Any:
    """deploy/broker_conf.py as a module (deploy/ is not a package): the one place
    that renders the config, makes the broker's files, finds mosquitto and ports."""
    path = DEPLOY / "broker_conf.py"
    spec = importlib.util.spec_from_file_location("cellwatch_deploy_broker_conf", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_broker_conf = _load_broker_conf()


def mosquitto_executable() -> str:
    """Path of the mosquitto binary; fails the test (never skips) without one."""
    found: str | None = _broker_conf.mosquitto_executable()
    if found is None:
        pytest.fail(
            "mosquitto not found: run `make test` (installs it) or apt-get install mosquitto",
            pytrace=False,
        )
    return found


def free_port() -> int:
    """A TCP port nobody listens on right now (the broker binds it soon after)."""
    port: int = _broker_conf.free_port(HOST)
    return port


def render_config(
    src_text: str,
    out_dir: Path,
    port: int,
    tls_port: int,
    bind: str = HOST,
    user: str | None = None,
) -> str:
    """deploy/broker_conf.py's render(), typed."""
    text: str = _broker_conf.render(src_text, out_dir, port, tls_port, bind, user=user)
    return text


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run deploy/NAME with bash; with check, a failure raises with the script's output."""
    proc: subprocess.CompletedProcess[str] = _broker_conf.run_script(name, *args)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"deploy/{name} {' '.join(args)} failed with exit code {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def _run_as() -> str | None:
    """The `user` line for the test broker: as root, stay root (the mosquitto user
    cannot enter pytest's private temporary directories); otherwise it is ignored."""
    return getpass.getuser() if os.geteuid() == 0 else None


class Inbox:
    """Collects messages from a message handler (paho's thread); waits on events."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._messages: list[Message] = []

    def __call__(self, msg: Message) -> None:
        with self._cond:
            self._messages.append(msg)
            self._cond.notify_all()

    @property
    def messages(self) -> list[Message]:
        with self._cond:
            return list(self._messages)

    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = WAIT_S) -> bool:
        """True as soon as predicate(messages so far) holds; False after timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._messages), timeout)

    def wait_topic(self, topic: str, timeout: float = WAIT_S) -> bool:
        return self.wait_for(lambda ms: any(m.topic == topic for m in ms), timeout)

    def wait_count(self, count: int, timeout: float = WAIT_S) -> bool:
        return self.wait_for(lambda ms: len(ms) >= count, timeout)


def sync(client: MqttClient) -> None:
    """Return once the broker has processed everything client sent so far.

    A broker handles one connection's packets in order, so the PUBACK of a QoS 1
    publish means earlier SUBSCRIBEs are active. The publish goes to a topic no
    one may write: the broker answers "not authorized" and delivers nothing.
    """
    client.publish_wait("cellwatch-test/sync", b"", qos=1, timeout=WAIT_S)


@dataclass
class Broker:
    """A running test broker in `dir` (see the module docstring)."""

    dir: Path
    port: int
    tls_port: int
    nodes: list[str]
    host: str = HOST
    extra_config: str = ""
    """Appended to the rendered mosquitto.conf (a site broker's bridge: tests/sites/)."""
    executable: str = field(default_factory=mosquitto_executable)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _clients: list[MqttClient] = field(default_factory=list, init=False, repr=False)

    # -- creation ------------------------------------------------------------
    @classmethod
    def create(
        cls,
        dir: Path,
        nodes: Sequence[str] = DEFAULT_NODES,
        clients: Sequence[str] = (),
        extra_config: str = "",
    ) -> Broker:
        """Users, ACL, certificates, config in dir; a started broker on free ports.
        clients: lab client users of their own (mkusers.sh/mkacl.sh --client)."""
        mosquitto_executable()
        _broker_conf.make_files(dir, nodes, clients)
        attempts = 3
        for attempt in range(1, attempts + 1):
            broker = cls(
                dir=dir,
                port=free_port(),
                tls_port=free_port(),
                nodes=list(nodes),
                extra_config=extra_config,
            )
            broker.write_config()
            broker.log_file.unlink(missing_ok=True)
            try:
                broker.start()
                return broker
            except BrokerStartError as exc:
                # Another process may have taken a port between free_port() and bind.
                if "Address already in use" not in exc.log or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def write_config(self) -> Path:
        text = render_config(
            MOSQUITTO_CONF.read_text(), self.dir, self.port, self.tls_port, user=_run_as()
        )
        text += self.extra_config
        (self.dir / "data").mkdir(exist_ok=True)
        self.conf_file.write_text(text)
        return self.conf_file

    # -- paths and credentials -------------------------------------------------
    @property
    def conf_file(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.dir / "mosquitto.log"

    @property
    def ca_file(self) -> Path:
        return self.dir / "certs" / "ca.crt"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def password(self, user: str) -> str:
        return (self.dir / "secrets" / f"{user}.password").read_text().strip()

    def settings(self, user: str | None, tls: bool = False, **overrides: Any) -> MqttSettings:
        """MqttSettings that log in as user (None: anonymous) on the plain or TLS port."""
        values: dict[str, Any] = {
            "host": "localhost" if tls else self.host,
            "port": self.tls_port if tls else self.port,
            "username": user,
            "password": SecretStr(self.password(user)) if user is not None else None,
            "tls": TlsSettings(enabled=True, ca_file=self.ca_file) if tls else TlsSettings(),
            "connect_timeout_s": WAIT_S,
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 2.0,
        }
        values.update(overrides)
        return MqttSettings(**values)

    def connect(
        self,
        user: str | None,
        *,
        tls: bool = False,
        client_id: str | None = None,
        clean_start: bool = True,
        subscriptions: Sequence[tuple[str, int]] = (),
        handler: Callable[[Message], None] | None = None,
        **overrides: Any,
    ) -> MqttClient:
        """A connected MqttClient (disconnected by the fixture at teardown).

        Subscriptions given here are active when this returns (see sync())."""
        client = MqttClient(
            self.settings(user, tls=tls, **overrides),
            client_id=client_id or f"test-{user}-{len(self._clients)}",
            clean_start=clean_start,
            subscriptions=subscriptions,
        )
        if handler is not None:
            client.set_message_handler(handler)
        client.connect()
        self._clients.append(client)
        if subscriptions:
            sync(client)
        return client

    def close_clients(self) -> None:
        for client in reversed(self._clients):
            client.disconnect()
        self._clients.clear()

    # -- process -------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The mosquitto process id while it runs (benchmarks read its I/O counters)."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start mosquitto and wait until both ports accept connections."""
        if self.running:
            raise RuntimeError("the broker is already running")
        self._log = self.log_file.open("ab")
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(self.conf_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        proc = self._proc
        pending: list[int] = _broker_conf.wait_listening(
            [self.port, self.tls_port], lambda: proc.poll() is None, START_TIMEOUT_S, self.host
        )
        code = proc.poll()
        if code is not None:
            self._reap()
            raise BrokerStartError(f"mosquitto exited with code {code} on start", self.log_text())
        if pending:
            self.stop()
            raise BrokerStartError(
                f"mosquitto did not listen on ports {pending} within {START_TIMEOUT_S:g} s",
                self.log_text(),
            )

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, then SIGKILL); it saves its database on SIGTERM."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL: mosquitto saves nothing, so whatever changed since its last autosave
        (retained messages, sessions) is lost, as in a power cut."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def restart(self) -> None:
        """Stop and start again: same ports, same persistence directory."""
        self.stop()
        self.start()

    def reload(self, timeout: float = WAIT_S) -> None:
        """SIGHUP: mosquitto re-reads its config, password file and ACL."""
        if self._proc is None or not self.running:
            raise RuntimeError("the broker is not running")
        before = self.log_text().count("Reloading config.")
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count("Reloading config.") <= before:
            if time.monotonic() > deadline or not self.running:
                raise BrokerStartError("mosquitto did not reload on SIGHUP", self.log_text())
            time.sleep(0.02)

    def add_node(self, node_id: str, timeout: float = WAIT_S) -> None:
        """Add a node user and its ACL block, reload, and wait until it may log in."""
        run_script("mkusers.sh", str(self.dir), node_id)
        run_script("mkacl.sh", str(self.dir), node_id)
        self.nodes.append(node_id)
        self.reload(timeout)
        # The log line comes just before the reload itself: wait for its effect.
        deadline = time.monotonic() + timeout
        while True:
            probe = MqttClient(
                self.settings(node_id, connect_timeout_s=timeout),
                client_id=f"test-probe-{node_id}",
                clean_start=True,
            )
            try:
                probe.connect()
            except MqttError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            else:
                probe.disconnect()
                return


class BrokerStartError(RuntimeError):
    """mosquitto did not start; the message ends with its log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}; its log:\n{log}")
        self.log = log
