"""Supervised child processes for the benches: one owner for every start and stop.

A `Child` is one process slot (a node, the hub) that may be restarted many times.
Every transition of a slot (start, stop, a signal, the supervisor's restart after an
exit) runs under that child's lock, so "has it exited?" and "start it again" are one
step: a scenario that stops and starts a node while the supervisor watches it can
never end with two processes for one slot (the check-then-act race of issue 22: the
supervisor saw an exit, slept, and started a second process beside the one the
scenario had started meanwhile).

Each exit is recorded once with its cause, so a bench can tell a node that died on
its own (a crash, a give-up with exit code 4) from one the bench stopped or
signalled.
"""

from __future__ import annotations

import os
import signal as signals
import subprocess
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Cause(StrEnum):
    """Why a process ended."""

    OWN = "own"
    """Nothing from the bench: a crash, a test hook, a node that gave up."""
    SIGNALLED = "signalled"
    """The bench sent it a signal (`Child.signal`); the supervisor restarts it."""
    STOPPED = "stopped"
    """The bench stopped it (`Child.stop`); nothing restarts it until `start`."""


@dataclass(frozen=True)
class Exit:
    code: int
    cause: Cause
    signal: int | None
    """The signal the bench sent (SIGNALLED), else None."""
    at: float
    """time.monotonic() when the exit was recorded."""


class Child:
    """One supervised process slot. All methods are thread-safe."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.history: list[subprocess.Popen[bytes]] = []
        """Every process this slot started, oldest first."""
        self.exits: list[Exit] = []
        self.restarts = 0
        """Restarts by the supervisor after a non-zero exit."""
        self._lock = threading.Lock()
        self._supervised = True
        self._sent: int | None = None
        """The signal the bench sent to the current process."""
        self._recorded: subprocess.Popen[bytes] | None = None
        """The process whose exit is in `exits` (recorded once)."""
        self._restart_at: float | None = None

    # -- the bench's verbs (each one step under the lock) ----------------------------------
    def start(self, env: dict[str, str] | None = None) -> None:
        """Start a process (and supervise it); RuntimeError if one is running."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
            if self.proc is not None:
                self._record(self.proc, time.monotonic())
            if env is not None:
                self.env = env
            self._spawn()

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM and wait; not restarted until `start`. The exit code (None: none ran)."""
        with self._lock:
            self._supervised = False
            self._restart_at = None
            proc = self.proc
            if proc is None:
                return None
            if proc.poll() is None:
                self._sent = signals.SIGTERM
                proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        with self._lock:
            self._record(proc, time.monotonic(), Cause.STOPPED)
        return proc.returncode

    def signal(self, sig: int, *, restart: bool = True, env: dict[str, str] | None = None) -> None:
        """Send sig to the running process; the supervisor restarts it after it exits
        (with env, when given) unless restart is False (then only `start` does)."""
        with self._lock:
            if env is not None:
                self.env = env
            if not restart:
                self._supervised = False
                self._restart_at = None
            if self.proc is not None and self.proc.poll() is None:
                self._sent = sig
                self.proc.send_signal(sig)

    @property
    def running(self) -> bool:
        with self._lock:
            return self.proc is not None and self.proc.poll() is None

    def exits_since(self, index: int) -> list[Exit]:
        with self._lock:
            return list(self.exits[index:])

    # -- the supervisor's step --------------------------------------------------------------
    def supervise(self, now: float, restart_s: float) -> None:
        """Record an exit, and restart restart_s after it: one step under the lock, and
        only for the process that exited (never beside one started meanwhile)."""
        with self._lock:
            proc = self.proc
            if not self._supervised or proc is None or proc.poll() is None:
                return
            if self._recorded is not proc:
                self._record(proc, now)
                self._restart_at = now + restart_s
            if self._restart_at is not None and now >= self._restart_at:
                self.restarts += proc.returncode != 0
                self._spawn()

    # -- under the lock ---------------------------------------------------------------------
    def _record(
        self, proc: subprocess.Popen[bytes], now: float, cause: Cause | None = None
    ) -> None:
        if self._recorded is proc:
            return
        self._recorded = proc
        sent, self._sent = self._sent, None
        if cause is None:
            cause = Cause.SIGNALLED if sent is not None else Cause.OWN
        self.exits.append(Exit(int(proc.returncode), cause, sent, now))

    def _spawn(self) -> None:
        self._supervised = True
        self._restart_at = None
        self._sent = None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        self.history.append(self.proc)


class Supervisor:
    """Restarts supervised children that exited, `restart_s` later, like systemd's
    Restart=always with RestartSec (a scenario SIGTERMs a node to have it restarted
    with other settings); only restarts after a non-zero exit count as restarts."""

    def __init__(self, restart_s: float, period_s: float = 0.05) -> None:
        self.restart_s = restart_s
        self.period_s = period_s
        self.children: list[Child] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def begin(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for child in self.children:
                child.supervise(time.monotonic(), self.restart_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for child in self.children:
            child.stop(30)
