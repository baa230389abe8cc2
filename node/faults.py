"""The node's one fault-injection seam: how tests and `bench/chaos.py` make a real node
fail the way hardware, disks and bad images do.

Product code calls `faults.at(point, n=..., key=...)` at a few named points
(`FaultPoint`); with no fault configured (the production case) that is one attribute
check and returns False. A configured fault acts there: it raises the error the
failing part would raise, kills the process, blocks (a slow disk), or returns True,
and the caller then behaves as the failing part does (an inference that never
finishes). What each fault does lives here, not at the points.

A node process is configured with the environment variable `CELLWATCH_TEST_FAULTS`
(comma-separated `key=value`), which `cellwatch-node run` reads once at start
(`Faults.from_env`); in-process tests build a `Faults` directly and may add hooks of
their own at any point (`hooks=`). The NodeService is built with one Faults object
and hands it to the parts that have points.

    infer_fail_after=N   from the Nth inference on, the model compiled at start never
                         calls back (what OpenVINO's AsyncInferQueue does when an
                         inference fails: a device reset or an NPU/GPU error); the
                         infer request itself is free again
    infer_hang_after=N   from the Nth inference on, inferences never finish (a hung
                         device): no callback, and the infer request stays busy
    recompile_fails=1    recompiling the model after device errors fails
    crash_image=ID       the process kills itself (SIGKILL) when it starts decoding
                         image ID: a poison image (a decoder crash, an OOM kill)
    compile_raises_at=N  the Nth bundle compile of this process (the start bundle's
                         is the first) raises OpenVINO's RuntimeError
    disk_full_once=1     the first downloaded bundle moved into the store raises
                         OSError(ENOSPC), as a full disk does
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from cellwatch.shared.errors import ConfigError

log = logging.getLogger(__name__)

ENV_VAR = "CELLWATCH_TEST_FAULTS"


class FaultPoint(StrEnum):
    """Where product code asks the seam (what n and key are there)."""

    DECODE = "decode"
    """A decode worker starts on an image (key: its image id)."""
    INFER_START = "infer_start"
    """An inference is about to start (n: the model's nth); True: it never finishes."""
    INFER_DONE = "infer_done"
    """An inference finished (n: which one); True: its callback never comes."""
    COMPILE = "compile"
    """A bundle compile begins (counted by the seam)."""
    RECOMPILE = "recompile"
    """The node recompiles its model after device errors."""
    STORE_PROMOTE = "store_promote"
    """A downloaded bundle moves into the store."""
    JOURNAL_SYNC = "journal_sync"
    """The image journal's compaction syncs its new file to disk."""


_KEYS = (
    "infer_fail_after",
    "infer_hang_after",
    "recompile_fails",
    "crash_image",
    "compile_raises_at",
    "disk_full_once",
)
"""The faults CELLWATCH_TEST_FAULTS may set."""

Hook = Callable[[int | None, str | None], bool]
"""An extra action at a point: hook(n, key); True acts as a fault that drops the
callback (see FaultPoint); it may also raise or block."""


@dataclass
class _Counts:
    compiles: int = 0
    disk_full_done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Faults:
    infer_fail_after: int | None = None
    infer_hang_after: int | None = None
    recompile_fails: bool = False
    crash_image: str | None = None
    compile_raises_at: int | None = None
    disk_full_once: bool = False
    hooks: Mapping[FaultPoint, Hook] = field(default_factory=dict, compare=False)
    _counts: _Counts = field(default_factory=_Counts, compare=False, repr=False)
    any: bool = field(default=False, init=False, compare=False)
    """Whether any fault is configured (False: the seam does nothing)."""

    def __post_init__(self) -> None:
        configured = bool(self.hooks) or any(
            getattr(self, key) not in (None, False) for key in _KEYS
        )
        object.__setattr__(self, "any", configured)

    def at(self, point: FaultPoint, *, n: int | None = None, key: str | None = None) -> bool:
        """Product code reached point: act out the fault configured there, if any."""
        if not self.any:
            return False
        hook = self.hooks.get(point)
        if hook is not None and hook(n, key):
            return True
        if point is FaultPoint.INFER_START:
            return _reached(n, self.infer_hang_after)
        if point is FaultPoint.INFER_DONE:
            return _reached(n, self.infer_fail_after)
        if point is FaultPoint.DECODE and key is not None and key == self.crash_image:
            log.error("test fault: image %s kills this process", key)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
        elif point is FaultPoint.COMPILE:
            with self._counts.lock:
                self._counts.compiles += 1
                count = self._counts.compiles
            if count == self.compile_raises_at:
                raise RuntimeError(f"test fault: compile {count} fails")
        elif point is FaultPoint.RECOMPILE and self.recompile_fails:
            raise RuntimeError("test fault: recompiling fails")
        elif point is FaultPoint.STORE_PROMOTE and self.disk_full_once:
            with self._counts.lock:
                first, self._counts.disk_full_done = not self._counts.disk_full_done, True
            if first:
                raise OSError(errno.ENOSPC, "test fault: no space left on device")
        return False

    @classmethod
    def parse(cls, text: str) -> Faults:
        """Faults from `key=value,...`; ConfigError naming the bad part."""
        values: dict[str, str] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or key not in _KEYS:
                raise ConfigError(f"{ENV_VAR}: unknown fault {part!r}")
            values[key] = value
        try:
            return cls(
                infer_fail_after=_count(values.get("infer_fail_after")),
                infer_hang_after=_count(values.get("infer_hang_after")),
                recompile_fails=values.get("recompile_fails", "0") not in ("0", ""),
                crash_image=values.get("crash_image") or None,
                compile_raises_at=_count(values.get("compile_raises_at")),
                disk_full_once=values.get("disk_full_once", "0") not in ("0", ""),
            )
        except ValueError as exc:
            raise ConfigError(f"{ENV_VAR}: {exc}") from exc

    @classmethod
    def from_env(cls) -> Faults:
        faults = cls.parse(os.environ.get(ENV_VAR, ""))
        if faults.any:
            log.warning("TEST FAULTS ACTIVE (%s=%s)", ENV_VAR, os.environ[ENV_VAR])
        return faults


NO_FAULTS = Faults()


def _reached(n: int | None, after: int | None) -> bool:
    return after is not None and n is not None and n >= after


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"a count must be >= 1, got {n}")
    return n
