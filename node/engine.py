"""OpenVINO inference: device checks, compiling a verified bundle, the async queue.

A `ServingModel` is one compiled bundle with its own `AsyncInferQueue`. The node
swaps whole ServingModels; requests already started finish on the model they began
with, because each carries its model along (see `service.py`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import openvino as ov

from cellwatch.node.errors import DeviceError, ModelLoadError, SelfTestError
from cellwatch.shared.bundle import Bundle

log = logging.getLogger(__name__)

VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")
PerformanceHint = Literal["throughput", "latency"]
LOW_PRECISION_TOLERANCE = 0.1
"""Self-test bound when the device computes in bf16/f16 rather than f32 (e.g. CPUs with
AVX512-BF16 by default): golden vectors are f32 outputs, and reduced precision moves
probabilities by up to a few hundredths. Top-1 must still agree wherever the expected
decision is clear (margin above twice this bound)."""
CompletionCallback = Callable[[np.ndarray | None, Any, BaseException | None], None]
"""callback(probabilities or None, userdata, error or None), on an OpenVINO thread."""


@dataclass(frozen=True)
class EngineConfig:
    device: str = "CPU"
    performance_hint: PerformanceHint = "throughput"
    force_f32: bool = False
    infer_requests: int = 0
    """0 = OpenVINO's optimal number for the hint and device."""
    cache_dir: str | None = None


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


class ServingModel:
    """A compiled bundle and its async infer queue."""

    def __init__(self, core: ov.Core, bundle: Bundle, config: EngineConfig) -> None:
        self.bundle = bundle
        self.labels = list(bundle.manifest.labels)
        try:
            model = core.read_model(str(bundle.file("model.xml")), str(bundle.file("model.bin")))
        except RuntimeError as exc:
            raise ModelLoadError(f"cannot read the IR of {bundle}: {exc}") from exc
        self._check_io(model)
        props: dict[str, Any] = {"PERFORMANCE_HINT": config.performance_hint.upper()}
        if config.force_f32:
            props["INFERENCE_PRECISION_HINT"] = "f32"
        if config.cache_dir:
            props["CACHE_DIR"] = config.cache_dir
        try:
            self.compiled = core.compile_model(model, config.device, props)
        except RuntimeError as exc:
            raise ModelLoadError(f"cannot compile {bundle} on {config.device}: {exc}") from exc
        self.precision = _precision(self.compiled)
        jobs = config.infer_requests or int(
            self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        )
        self.jobs = max(1, jobs)
        self._queue = ov.AsyncInferQueue(self.compiled, self.jobs)
        self._queue.set_callback(self._on_done)
        self._start_lock = threading.Lock()
        self._callback: CompletionCallback | None = None
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

    def start(self, x: np.ndarray, userdata: Any) -> None:
        """Queue one inference; blocks while every infer request is busy.

        AsyncInferQueue hands out idle requests without locking: two threads calling
        start_async at once can pick the same one ("Infer Request is busy").
        """
        with self._start_lock:
            self._queue.start_async({0: x}, userdata)

    def _on_done(self, request: ov.InferRequest, userdata: Any) -> None:
        callback = self._callback
        if callback is None:
            return
        try:
            probs = np.array(request.get_output_tensor(0).data, dtype=np.float32).reshape(-1)
        except RuntimeError as exc:
            callback(None, userdata, exc)
            return
        callback(probs, userdata, None)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Synchronous inference of one preprocessed input (CLI and self-test)."""
        self._sync_request.infer({0: x})
        return np.array(self._sync_request.get_output_tensor(0).data, dtype=np.float32).reshape(-1)

    def wait_all(self) -> None:
        self._queue.wait_all()

    def self_test(self) -> float:
        """Run the bundle's golden vectors; SelfTestError beyond tolerance. Returns max diff."""
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
        worst = 0.0
        for x, want in zip(inputs, expected, strict=True):
            got = self.infer(x[np.newaxis])
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
        log.info("model %s passed its self-test (max diff %.2g)", self.bundle, worst)
        return worst


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
