"""The system as an attacker meets it: a real Mosquitto with the configuration the
deploy/ scripts generate (two lab accounts of their own besides the shared `client`),
the hub and nodes as real processes (`cellwatch-hub serve`, `cellwatch-node run`)
with configuration files, as a production install runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cellwatch.shared.schemas import NodeStatus
from tests.broker import Broker, free_port
from tests.harness import Collector, T, wait_for

BIN = Path(sys.executable).parent
LABS = ("client-labA", "client-labB")
NODES = ("node-1", "node-2")
STOP_TIMEOUT_S = 60.0


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Added to the environment at each start (a test may change it between starts)."""
    http_port: int | None = None
    """The hub's HTTP port (hubs only)."""

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} runs already"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Until the process exits by itself; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT_S); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Stack:
    """Configuration files and processes in `work` around `broker`."""

    work: Path
    broker: Broker
    bundle: Path
    keys: Path
    processes: list[Process] = field(default_factory=list)

    def secret(self, user: str) -> Path:
        path = self.work / "secrets" / f"{user}.password"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.broker.password(user))
        return path

    def mqtt_section(self, user: str) -> str:
        return (
            f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n'
            f'username = "{user}"\npassword_file = "{self.secret(user)}"\n'
            "reconnect_max_s = 2.0\n"
        )

    def hub(self, data_dir: Path, name: str = "hub") -> Process:
        """A hub process (not started) on data_dir."""
        cfg = self.work / f"{name}.toml"
        port = free_port()
        cfg.write_text(
            f'data_dir = "{data_dir}"\ntrusted_keys = "{self.keys}"\ntick_s = 0.2\n'
            f'[http]\nlisten = "127.0.0.1:{port}"\n' + self.mqtt_section("hub")
        )
        hub = self._process(name, [str(BIN / "cellwatch-hub"), "serve", "--config", str(cfg)])
        hub.http_port = port
        return hub

    def node(
        self,
        node_id: str,
        store_dir: Path | None = None,
        *,
        extra: str = "",
        env: dict[str, str] | None = None,
        bundle: Path | None = None,
    ) -> Process:
        """A node process (not started) serving the stack's bundle (or `bundle`); with
        store_dir it takes part in rollouts; `extra`: TOML sections appended."""
        cfg = self.work / f"{node_id}.toml"
        updates = f'[updates]\nstore_dir = "{store_dir}"\n' if store_dir is not None else ""
        cfg.write_text(
            f'node_id = "{node_id}"\ntelemetry_interval_s = 1.0\n'
            f'state_dir = "{self.work / "state" / node_id}"\n'
            + self.mqtt_section(node_id)
            + f'[model]\nbundle = "{bundle or self.bundle}"\ntrusted_keys = "{self.keys}"\n'
            + updates
            + extra
        )
        p = self._process(node_id, [str(BIN / "cellwatch-node"), "run", "--config", str(cfg)])
        p.env.update(env or {})
        return p

    def operator_config(self) -> Path:
        """An operator.toml, as CELLWATCH_HUB_CLIENT_CONFIG names it."""
        cfg = self.work / "operator.toml"
        cfg.write_text("timeout_s = 30\n" + self.mqtt_section("operator"))
        return cfg

    def _process(self, name: str, argv: list[str]) -> Process:
        p = Process(name, argv, self.work / f"{name}.log")
        self.processes.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


def connections(broker: Broker, user: str) -> int:
    """How many times `user` logged in, from the broker's connection log."""
    return broker.log_text().count(f"u'{user}')")


class Boots:
    """A node's statuses as they come (as the operator reads them): how many of its
    processes said `online` so far."""

    def __init__(self, broker: Broker, node_id: str) -> None:
        self.topic = T.status(node_id)
        self.collector = Collector(broker.settings("operator"), self.topic, name="boots")

    def online(self) -> int:
        statuses = [NodeStatus.model_validate_json(m.payload) for m in self.collector.messages]
        return len({s.boot_id for s in statuses if s.state == "online"})

    def wait_online(self, count: int) -> None:
        """Until `count` processes of the node said `online`."""
        wait_for(lambda: self.online() >= count, 60, f"{self.topic}: process {count} online")

    def close(self) -> None:
        self.collector.close()
