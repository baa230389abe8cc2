"""Child processes of the demo: started with their own log, recorded in WORKDIR/pids,
stopped in order (SIGTERM, then SIGKILL) on exit, error or Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from rich.markup import escape

from demolib.common import (
    STOP_TIMEOUT_S,
    TRAIN_TIMEOUT_S,
    DemoError,
    Interrupted,
    Layout,
    command,
    console,
    doing,
    done,
    duration,
    log,
    shown,
)

HEARTBEAT_S = 30.0
"""A command silent for this long gets a line saying it is still running (and for how
long), so that no step looks stuck."""

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


def signal_process(pid: int, sig: int) -> None:
    """Signal pid's process group if it leads one (our children do), else pid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop_tier(name: str) -> int:
    """Stop order: commands and nodes first (their `offline` status reaches the hub),
    then the hub, the brokers (`mosquitto`, deploy/sites.py's `mosquitto-SITE`) last."""
    return 2 if name.startswith("mosquitto") else {"hub": 1}.get(name, 0)


def stop_recorded(layout: Layout, *, quiet: bool = False) -> list[str]:
    """Stop the processes WORKDIR/pids lists that still run (in stop_tier order); their
    names."""
    records = [r for r in read_pidfile(layout.pidfile) if r.alive()]
    records.sort(key=lambda r: stop_tier(r.name))
    for r in records:
        if not quiet:
            doing(f"stopping {r.name} (pid {r.pid}) left from an earlier run")
        signal_process(r.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while r.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if r.alive():
            signal_process(r.pid, signal.SIGKILL)
    layout.pidfile.unlink(missing_ok=True)
    return [r.name for r in records]


def stop_workdir(workdir: Path) -> int:
    """`down`: stop what an `up` (or an interrupted run) in workdir started, and say what."""
    layout = Layout(workdir.expanduser().resolve())
    names = stop_recorded(layout, quiet=True)
    if names:
        done(f"stopped {', '.join(names)}")
    else:
        done(f"nothing from {shown(layout.root)} was running")
    return 0


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
    started: float
    last_output: float
    """time.monotonic() of its last line (or its start)."""
    reader: threading.Thread | None = None


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
        now = time.monotonic()
        cmd = Command(child, [], now, now)
        cmd.reader = threading.Thread(
            target=self._read_lines, args=(child.proc.stdout, cmd, echo), daemon=True
        )
        cmd.reader.start()
        return cmd

    def finish(self, cmd: Command, *, timeout: float = TRAIN_TIMEOUT_S, check: bool = True) -> str:
        """Wait for a command; its stdout. With check, DemoError (with the end of its
        log) unless it exits 0. Services are checked meanwhile."""
        child = cmd.child
        deadline = time.monotonic() + timeout
        while child.proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                self._stop(child)
                raise DemoError(
                    f"{child.name} did not finish within {timeout:g} s; see {shown(child.log)}"
                )
            if now - cmd.last_output >= HEARTBEAT_S:
                cmd.last_output = now
                console.print(
                    f"      [dim]… {escape(child.name)} still running "
                    f"({duration(now - cmd.started)} so far; its log: {escape(shown(child.log))})"
                    "[/dim]"
                )
            self.check()
            time.sleep(0.05)
        if cmd.reader is not None:
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
    def _read_lines(stream: IO[bytes], cmd: Command, echo: bool) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            cmd.lines.append(line)
            cmd.last_output = time.monotonic()
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
            signal_process(child.proc.pid, signal.SIGTERM)

    def _stop(self, child: Child) -> None:
        if child.proc.poll() is None:
            self._terminate(child)
            try:
                child.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %s s: SIGKILL", child.name, STOP_TIMEOUT_S)
                signal_process(child.proc.pid, signal.SIGKILL)
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
