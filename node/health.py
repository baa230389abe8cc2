"""The node's health: the watchdog thread and the recompile after device errors.

Every WATCHDOG_PERIOD_S the watchdog answers the inferences the device never
finished (`device_error`, through the pipeline's completion), lets go of retired
models whose last inference ended (node/slot.py), and, after `max_device_errors`
consecutive device errors, recompiles the current model. When even that fails the
node gives up: it stops with exit code EXIT_DEVICE_FAILED, for systemd to restart it.
The watchdog runs until the very end of a shutdown: the drain may need it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import openvino as ov

from cellwatch.node.engine import CompletionCallback, EngineConfig, load_serving_model
from cellwatch.node.errors import ModelLoadError
from cellwatch.node.faults import FaultPoint, Faults
from cellwatch.node.slot import ModelSlot

log = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 0.25
EXIT_DEVICE_FAILED = 3


class Health:
    def __init__(
        self,
        node_id: str,
        *,
        slot: ModelSlot,
        on_inferred: CompletionCallback,
        core: ov.Core,
        engine: EngineConfig,
        self_test: bool,
        max_device_errors: int,
        faults: Faults,
        stopping: threading.Event,
        give_up: Callable[[int], None],
    ) -> None:
        self.node_id = node_id
        self.slot = slot
        self._on_inferred = on_inferred
        self.core = core
        self.engine = engine
        self.self_test = self_test
        self.max_device_errors = max_device_errors
        self.faults = faults
        self._stopping = stopping
        self._give_up = give_up
        """give_up(exit code): stop the node because it cannot serve."""
        self._recompile = threading.Event()
        self._stop = threading.Event()

    def on_device_error(self, consecutive: int) -> None:
        """The pipeline counted another device error in a row."""
        if consecutive >= self.max_device_errors:
            self._recompile.set()

    def run(self) -> None:
        """The watchdog thread (until `stop`)."""
        while not self._stop.wait(WATCHDOG_PERIOD_S):
            try:
                self.check()
            except Exception:  # the watchdog must outlive anything it sees
                log.exception("node %s: watchdog step failed", self.node_id)

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        now = time.monotonic()
        for model in self.slot.watched():
            for job in model.expired(now):
                self._on_inferred(
                    model,
                    None,
                    job,
                    TimeoutError(f"no answer within {model.config.infer_timeout_s:g} s"),
                )
        if self._recompile.is_set() and not self._stopping.is_set():
            self._recompile.clear()
            self._recover()

    def _recover(self) -> None:
        """Recompile the current model after repeated device errors; give up if that
        fails."""
        model = self.slot.current()
        if model is None:
            return
        log.error(
            "node %s: %d consecutive device errors on %s: recompiling %s",
            self.node_id,
            self.max_device_errors,
            model.config.device,
            model.bundle,
        )
        try:
            self.faults.at(FaultPoint.RECOMPILE)
            fresh = load_serving_model(
                self.core, model.bundle, self.engine, self_test=self.self_test
            )
        except (ModelLoadError, RuntimeError) as exc:
            log.error(
                "node %s: the device did not recover (%s): going offline and exiting with "
                "code %d so that systemd restarts the node",
                self.node_id,
                exc,
                EXIT_DEVICE_FAILED,
            )
            self._give_up(EXIT_DEVICE_FAILED)
            return
        self.slot.activate(fresh)
