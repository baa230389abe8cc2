"""OpenVINO inference: device checks, compiling a verified bundle, the async queue.

A `ServingModel` is one compiled bundle with its own `AsyncInferQueue`. The node
swaps whole ServingModels; requests already started finish on the model they began
with (the completion callback names the model).

The compiled model takes the node's 8-bit pixels (uint8 NHWC, `crop_and_resize`'s
output): OpenVINO's PrePostProcessor folds the conversion to the model's float range
into it at load time (the bundle's IR is unchanged). That costs less CPU than doing
it in NumPy and handing over four times the bytes (bench/node_throughput.py). The
golden self-test runs the IR as shipped (float inputs) and then holds the served
model's pixel input to the same answers.

Every started inference ends exactly once: in the completion callback, or, when the
device never calls back (OpenVINO's AsyncInferQueue calls the Python callback only
for an inference that succeeded; a hung device never finishes), through `expired()`,
which the node's watchdog polls. The queue's userdata is a plain job number and its
callback holds the model only weakly, so a retired model has no reference cycle
through the binding and is freed once its last request finished.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import openvino as ov
from openvino.preprocess import PrePostProcessor

from cellwatch.node.errors import (
    DeviceError,
    InferenceError,
    ModelLoadError,
    ModelRetired,
    SelfTestError,
)
from cellwatch.node.faults import NO_FAULTS, FaultPoint, Faults
from cellwatch.node.preprocess import PIXEL_OFFSET, PIXEL_SCALE, to_model_range
from cellwatch.shared.bundle import Bundle

log = logging.getLogger(__name__)

VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")
PerformanceHint = Literal["throughput", "latency"]
LOW_PRECISION_TOLERANCE = 0.1
"""Self-test bound when the device computes in bf16/f16 rather than f32 (e.g. CPUs with
AVX512-BF16 by default): golden vectors are f32 outputs, and reduced precision moves
probabilities by up to a few hundredths. Top-1 must still agree wherever the expected
decision is clear (margin above twice this bound)."""
CompletionCallback = Callable[["ServingModel", np.ndarray | None, Any, BaseException | None], None]
"""callback(model, probabilities or None, userdata, error or None): on an OpenVINO
thread for a finished inference, on the watchdog's thread for an expired one."""
SLOT_POLL_S = 0.2
"""How often a thread waiting for an idle infer request checks the model was retired."""
GIVE_WAY_POLL_MS = 1
"""How often an inference that gives way (`infer_unless`) asks whether it must."""


@dataclass(frozen=True)
class EngineConfig:
    device: str = "CPU"
    performance_hint: PerformanceHint = "throughput"
    force_f32: bool = False
    infer_requests: int = 0
    """0 = OpenVINO's optimal number for the hint and device."""
    cache_dir: str | None = None
    infer_timeout_s: float = 30.0
    """An inference not finished this long after it started is given up (a device error)."""
    threads: int = 0
    """CPU threads one inference may use; 0 = OpenVINO's choice (the shadow candidate
    takes 1, so it leaves the other cores to the serving model)."""


def available_devices(core: ov.Core) -> list[str]:
    return list(core.available_devices)


def check_device(core: ov.Core, device: str) -> None:
    """DeviceError unless device (or every device a virtual one names) is present."""
    present = available_devices(core)
    head, _, rest = device.partition(":")
    if head in VIRTUAL_DEVICES:
        wanted = [d for d in rest.split(",") if d] if rest else []
    else:
        wanted = [device]
    for name in wanted:
        if name not in present and name.split(".")[0] not in {p.split(".")[0] for p in present}:
            hint = " (MYRIAD needs OpenVINO 2022.3 or older)" if name.startswith("MYRIAD") else ""
            raise DeviceError(
                f"OpenVINO device {name!r} is not available{hint}; "
                f"devices present: {', '.join(present) or 'none'}"
            )


@dataclass
class _Job:
    userdata: Any
    deadline: float


def _completion(ref: weakref.ReferenceType[ServingModel]) -> Callable[[Any, Any], None]:
    """The queue's callback: holds the model weakly and never raises (an exception
    raised here is kept by the binding and raised again by every later start_async)."""

    def on_done(request: ov.InferRequest, job: Any) -> None:
        try:
            model = ref()
            if model is not None:
                model._complete(request, int(job))
        except BaseException:
            log.exception("inference completion failed")

    return on_done


def with_pixel_input(model: ov.Model) -> ov.Model:
    """model (float input in [-1, 1]) taking uint8 pixels instead, converted inside as
    `preprocess.to_model_range` does: pixel / PIXEL_SCALE - PIXEL_OFFSET."""
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8)
    ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(PIXEL_SCALE).mean(PIXEL_OFFSET)
    return ppp.build()


class ServingModel:
    """A compiled bundle (taking uint8 pixels) and its async infer queue."""

    def __init__(self, core: ov.Core, bundle: Bundle, config: EngineConfig) -> None:
        self.bundle = bundle
        self.config = config
        self.labels = list(bundle.manifest.labels)
        self._core = core
        self._props: dict[str, Any] = {"PERFORMANCE_HINT": config.performance_hint.upper()}
        if config.force_f32:
            self._props["INFERENCE_PRECISION_HINT"] = "f32"
        if config.cache_dir:
            self._props["CACHE_DIR"] = config.cache_dir
        if config.threads:
            self._props["INFERENCE_NUM_THREADS"] = config.threads
        model = self._read_ir()
        self._check_io(model)
        self.compiled = self._compile(with_pixel_input(model))
        self.precision = _precision(self.compiled)
        jobs = config.infer_requests or int(
            self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        )
        self.jobs = max(1, jobs)
        self._queue = ov.AsyncInferQueue(self.compiled, self.jobs)
        self._queue.set_callback(_completion(weakref.ref(self)))
        self._start_lock = threading.Lock()
        self._callback: CompletionCallback | None = None
        self._slots = threading.Semaphore(self.jobs)
        self._lock = threading.Lock()
        self._pending: dict[int, _Job] = {}
        self._job_ids = itertools.count(1)
        self._retired = False
        self._faults = NO_FAULTS
        self._started = 0
        self._sync_request = self.compiled.create_infer_request()
        log.info(
            "model %s compiled on %s (%s hint, %s precision, %d infer requests)",
            bundle,
            config.device,
            config.performance_hint,
            self.precision,
            self.jobs,
        )
        if self.flags:
            log.warning(
                "model %s is %s (see its MODEL_CARD.md): not for real decisions",
                bundle,
                ", ".join(f.upper() for f in self.flags),
            )

    @property
    def flags(self) -> list[str]:
        """The model's warnings (synthetic, untrained, degraded) for status and logs."""
        return list(self.bundle.manifest.flags)

    def _read_ir(self) -> ov.Model:
        bundle = self.bundle
        try:
            return self._core.read_model(
                str(bundle.file("model.xml")), str(bundle.file("model.bin"))
            )
        except RuntimeError as exc:
            raise ModelLoadError(f"cannot read the IR of {bundle}: {exc}") from exc

    def _compile(self, model: ov.Model) -> ov.CompiledModel:
        try:
            return self._core.compile_model(model, self.config.device, self._props)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"cannot compile {self.bundle} on {self.config.device}: {exc}"
            ) from exc

    def _check_io(self, model: ov.Model) -> None:
        spec = self.bundle.manifest.input
        if len(model.inputs) != 1 or len(model.outputs) < 1:
            raise ModelLoadError(f"{self.bundle}: model must have one input and an output")
        shape = model.input(0).get_partial_shape()
        if shape.is_static and tuple(shape.to_shape()) != tuple(spec.shape):
            raise ModelLoadError(
                f"{self.bundle}: IR input shape {shape} differs from the manifest's {spec.shape}"
            )
        out_shape = model.output(0).get_partial_shape()
        if out_shape.is_static and tuple(out_shape.to_shape())[-1] != len(self.labels):
            raise ModelLoadError(
                f"{self.bundle}: IR output {out_shape} does not match {len(self.labels)} labels"
            )

    def set_callback(self, callback: CompletionCallback) -> None:
        self._callback = callback

    def inject(self, faults: Faults) -> None:
        """The fault seam (node/faults.py) for this compiled model's inferences."""
        self._faults = faults

    @property
    def pending(self) -> int:
        """Inferences started and not yet ended (completed or expired)."""
        with self._lock:
            return len(self._pending)

    @property
    def retired(self) -> bool:
        return self._retired

    def start(self, x: np.ndarray, userdata: Any, *, wait_s: float) -> None:
        """Queue one inference; waits up to wait_s while every infer request is busy.

        InferenceError when no infer request became idle in time (a stalled device) or
        OpenVINO refused the request; ModelRetired when the model was replaced while
        waiting (start again on the new one). AsyncInferQueue hands out idle requests
        without locking: two threads calling start_async at once can pick the same one
        ("Infer Request is busy"), hence the lock.
        """
        give_up = time.monotonic() + wait_s
        while not self._slots.acquire(timeout=SLOT_POLL_S):
            if self._retired:
                raise ModelRetired(f"{self.bundle} was replaced")
            if time.monotonic() > give_up:
                raise InferenceError(
                    f"no infer request of {self.bundle} became free within {wait_s:g} s "
                    "(the device is not finishing inferences)"
                )
        if self._retired:
            self._slots.release()
            raise ModelRetired(f"{self.bundle} was replaced")
        job = next(self._job_ids)
        with self._lock:
            self._pending[job] = _Job(userdata, time.monotonic() + self.config.infer_timeout_s)
            self._started += 1
            started = self._started
        if self._faults.at(FaultPoint.INFER_START, n=started):
            return  # a hung device: it took the inference and never finishes
        try:
            with self._start_lock:
                self._queue.start_async({0: x}, job)
        except RuntimeError as exc:
            with self._lock:
                self._pending.pop(job, None)
            self._slots.release()
            raise InferenceError(f"OpenVINO refused the inference: {exc}") from exc

    def _complete(self, request: ov.InferRequest, job: int) -> None:
        """An infer request finished (OpenVINO thread)."""
        self._slots.release()
        with self._lock:
            entry = self._pending.pop(job, None)
            if entry is not None and self._faults.at(FaultPoint.INFER_DONE, n=job):
                self._pending[job] = entry  # a failed inference never calls back
                return
        if entry is None:
            return  # the watchdog already answered it
        callback = self._callback
        if callback is None:
            return
        try:
            probs = np.array(request.get_output_tensor(0).data, dtype=np.float32).reshape(-1)
        except RuntimeError as exc:
            callback(self, None, entry.userdata, InferenceError(f"no output: {exc}"))
            return
        callback(self, probs, entry.userdata, None)

    def expired(self, now: float) -> list[Any]:
        """Userdata of inferences past their deadline, each returned once (watchdog).
        Their infer requests stay counted as busy until the device lets them go."""
        with self._lock:
            late = [job for job, e in self._pending.items() if e.deadline <= now]
            return [self._pending.pop(job).userdata for job in late]

    def retire(self) -> None:
        """Stop taking inferences (threads waiting in start() get ModelRetired); the ones
        started still end through the callback or `expired()`."""
        self._retired = True

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Synchronous inference of one uint8 (1, S, S, 3) input (the CLI, the self-test)."""
        return _infer(self._sync_request, pixels)

    def infer_unless(self, pixels: np.ndarray, stop: Callable[[], bool]) -> np.ndarray | None:
        """`infer` that gives way: None, the inference cancelled, as soon as stop() is
        true (asked before the first wait and every GIVE_WAY_POLL_MS): the shadow
        candidate's, which must not hold the CPU while a live image waits."""
        request = self._sync_request
        request.start_async({0: pixels})
        while True:
            if stop():
                request.cancel()
                with contextlib.suppress(RuntimeError):  # "Infer Request was canceled"
                    request.wait()
                return None
            if request.wait_for(GIVE_WAY_POLL_MS):
                return np.array(request.get_output_tensor(0).data, dtype=np.float32).reshape(-1)

    def self_test(self) -> float:
        """Run the bundle's golden vectors through the IR as shipped, then the served
        model's pixel input against the IR on the same pixels; SelfTestError beyond
        tolerance. Returns the larger max difference."""
        golden = self.bundle.manifest.golden
        if golden is None:
            log.warning("bundle %s has no golden vectors: self-test skipped", self.bundle)
            return 0.0
        try:
            with np.load(self.bundle.file(golden.file), allow_pickle=False) as data:
                inputs = np.asarray(data["inputs"], dtype=np.float32)
                expected = np.asarray(data["probabilities"], dtype=np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise SelfTestError(f"{self.bundle}: unreadable golden vectors: {exc}") from exc
        if inputs.ndim != 4 or expected.shape != (inputs.shape[0], len(self.labels)):
            raise SelfTestError(f"{self.bundle}: golden vectors have the wrong shape")
        tolerance = golden.tolerance
        if self.precision != "f32":
            tolerance = max(tolerance, LOW_PRECISION_TOLERANCE)
        ir = self._compile(self._read_ir()).create_infer_request()
        worst = 0.0
        for x, want in zip(inputs, expected, strict=True):
            got = _infer(ir, x[np.newaxis])
            worst = max(worst, float(np.max(np.abs(got - want))))
            top2 = np.sort(want)[-2:]
            if top2[1] - top2[0] > 2 * tolerance and int(np.argmax(got)) != int(np.argmax(want)):
                raise SelfTestError(
                    f"{self.bundle}: self-test failed, a golden vector changed class"
                )
        if worst > tolerance:
            raise SelfTestError(
                f"{self.bundle}: self-test failed, max difference {worst:.3g} > "
                f"tolerance {tolerance:g} ({self.precision} precision)"
            )
        # The same images as 8-bit pixels: served model (conversion inside) vs the IR.
        pixels = np.clip(np.rint((inputs + PIXEL_OFFSET) * PIXEL_SCALE), 0, 255).astype(np.uint8)
        served = 0.0
        for p in pixels:
            want = _infer(ir, to_model_range(p[np.newaxis]))
            served = max(served, float(np.max(np.abs(self.infer(p[np.newaxis]) - want))))
        if served > tolerance:
            raise SelfTestError(
                f"{self.bundle}: self-test failed, the model's pixel input differs from the "
                f"IR by {served:.3g} > tolerance {tolerance:g} ({self.precision} precision)"
            )
        worst = max(worst, served)
        log.info("model %s passed its self-test (max diff %.2g)", self.bundle, worst)
        return worst


def _infer(request: ov.InferRequest, x: np.ndarray) -> np.ndarray:
    request.infer({0: x})
    return np.array(request.get_output_tensor(0).data, dtype=np.float32).reshape(-1)


def _precision(compiled: ov.CompiledModel) -> str:
    """The precision the device computes in ("f32", "bf16", "f16"; "f32" if unknown)."""
    try:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT").to_string())
    except (RuntimeError, AttributeError):
        return "f32"


def load_serving_model(
    core: ov.Core, bundle: Bundle, config: EngineConfig, *, self_test: bool = True
) -> ServingModel:
    """Compile a verified bundle and (by default) run its golden self-test."""
    model = ServingModel(core, bundle, config)
    if self_test:
        model.self_test()
    return model
