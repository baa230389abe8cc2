"""frozen.pb -> OpenVINO IR (fp32, fp16, int8 via NNCF), and running the IR for checks.

int8 is NNCF post-training quantisation (`quantize`); when that misses the export
gate, `quantize_with_accuracy_control` keeps the layers that matter most in floating
point until a validation metric (export passes agreement with TensorFlow on the
validation split) drops by no more than allowed.

The IR keeps the contract's names: input `input` f32 [1, 299, 299, 3] NHWC (RGB in
[-1, 1]) and output `probabilities` (softmax over the labels). OpenVINO's TensorFlow
frontend would call them `input:0` and `InceptionV3/Predictions/Reshape_1:0`; we
set the tensor names explicitly so the manifest can name them plainly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openvino as ov

from cellwatch.training.errors import ExportError
from cellwatch.training.evalgraph import FROZEN_INPUT_SHAPE
from cellwatch.training.network import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
"""Parity checks and golden vectors run the IR with f32 arithmetic on the CPU."""
MAX_REVERTED = 8
"""Accuracy-aware int8 reverts at most this many quantised groups to floating point:
each step re-ranks the rest (about a minute for Inception V3 on 2 CPUs), and a model
that needs more is better shipped as fp16."""
DEVICE_DEFAULT: dict[str, str] = {}
"""What a node runs by default: OpenVINO picks the inference precision (bf16 on CPUs
with AVX512-BF16/AMX, f32 elsewhere)."""


def convert(frozen_pb: Path) -> Any:
    """The frozen graph as an OpenVINO model with the contract's input and output names."""
    try:
        model = ov.convert_model(str(frozen_pb))
    except Exception as exc:  # OpenVINO raises several unrelated types
        raise ExportError(f"OpenVINO could not convert {frozen_pb}: {exc}") from exc
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            f"converted model has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs; expected one each"
        )
    shape = tuple(model.inputs[0].get_partial_shape().to_shape())
    out_shape = tuple(model.outputs[0].get_partial_shape().to_shape())
    if shape != FROZEN_INPUT_SHAPE or out_shape != (1, NUM_CLASSES):
        raise ExportError(
            f"converted model maps {shape} -> {out_shape}; expected "
            f"{FROZEN_INPUT_SHAPE} -> (1, {NUM_CLASSES})"
        )
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return model


def quantize(model: Any, calibration: Sequence[np.ndarray]) -> Any:
    """int8 post-training quantisation with NNCF on preprocessed inputs [1, 299, 299, 3]."""
    import nncf  # imported late: slow, and only int8 needs it

    _quiet(nncf)
    if not calibration:
        raise ExportError("int8 needs calibration images, and the training split gave none")
    log.info("quantising to int8 with NNCF on %d calibration images", len(calibration))
    try:
        return nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration))
    except Exception as exc:  # NNCF wraps OpenVINO and NumPy errors alike
        raise ExportError(f"NNCF int8 quantisation failed: {exc}") from exc


def quantize_with_accuracy_control(
    model: Any,
    calibration: Sequence[np.ndarray],
    validation: Sequence[np.ndarray],
    metric: Callable[[np.ndarray], float],
    max_drop: float,
) -> Any:
    """NNCF accuracy-aware int8: revert the most harmful quantisers to floating point (at
    most MAX_REVERTED) until metric(probabilities of the validation inputs) is at most
    max_drop below the float model's."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    _quiet(nncf)
    if not calibration or not validation:
        raise ExportError("accuracy-aware int8 needs calibration and validation images")

    def validate(compiled: Any, items: Iterable[np.ndarray]) -> float:
        probs = np.concatenate([np.asarray(compiled({0: x})[0]).reshape(1, -1) for x in items])
        return float(metric(probs))

    log.info(
        "int8 with accuracy control: %d calibration, %d validation images, max drop %g",
        len(calibration),
        len(validation),
        max_drop,
    )
    try:
        return nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(list(calibration)),
            nncf.Dataset(list(validation)),
            validate,
            max_drop=max_drop,
            subset_size=len(calibration),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=MAX_REVERTED
            ),
        )
    except Exception as exc:  # NNCF wraps OpenVINO and NumPy errors alike
        raise ExportError(f"NNCF accuracy-aware int8 quantisation failed: {exc}") from exc


def _quiet(nncf: Any) -> None:
    """NNCF sets its own logger to INFO on import; keep it to warnings (-v shows debug)."""
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        nncf.set_log_level(logging.WARNING)


def save(model: Any, xml: Path, precision: Precision) -> None:
    """Write model.xml + model.bin; fp16 compresses the weights, fp32/int8 keep f32 constants."""
    ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")


class CompiledIR:
    """An IR compiled on the CPU: f32 inference precision unless config says otherwise
    (`DEVICE_DEFAULT`: what a node does)."""

    device = "CPU"

    def __init__(self, xml: Path, config: dict[str, str] | None = None) -> None:
        core = ov.Core()
        self.model = core.read_model(str(xml))
        props = dict(F32 if config is None else config)
        self.compiled = core.compile_model(self.model, self.device, props)
        self._request = self.compiled.create_infer_request()

    @property
    def inference_precision(self) -> str:
        """What the device computes in ("f32", "bf16", "f16")."""
        try:
            return str(self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string())
        except (RuntimeError, AttributeError):  # pragma: no cover - very old OpenVINO
            return "f32"

    @property
    def output_name(self) -> str:
        return str(self.model.outputs[0].get_any_name())

    @property
    def input_name(self) -> str:
        return str(self.model.inputs[0].get_any_name())

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for inputs [N, 299, 299, 3], one request at a time."""
        out = np.zeros((len(inputs), NUM_CLASSES), np.float32)
        for i, x in enumerate(inputs):
            self._request.infer({0: np.ascontiguousarray(x[np.newaxis], dtype=np.float32)})
            out[i] = self._request.get_output_tensor(0).data.reshape(-1)
        return out
