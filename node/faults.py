"""Test hooks that make a real node fail the way hardware and bad images do.

Set with the environment variable `CELLWATCH_TEST_FAULTS` (comma-separated
`key=value`), read once when the node starts; tests, `bench/chaos.py` and nothing
else set it. Without it the node runs exactly as in production.

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

import logging
import os
import signal
from dataclasses import dataclass

from cellwatch.shared.errors import ConfigError

log = logging.getLogger(__name__)

ENV_VAR = "CELLWATCH_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    infer_fail_after: int | None = None
    infer_hang_after: int | None = None
    recompile_fails: bool = False
    crash_image: str | None = None
    compile_raises_at: int | None = None
    disk_full_once: bool = False

    @property
    def any(self) -> bool:
        return self != Faults()

    @classmethod
    def parse(cls, text: str) -> Faults:
        """Faults from `key=value,...`; ConfigError naming the bad part."""
        values: dict[str, str] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
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

    def crash_if_poison(self, image_id: str) -> None:
        if self.crash_image is not None and image_id == self.crash_image:
            log.error("test fault: image %s kills this process", image_id)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"a count must be >= 1, got {n}")
    return n
