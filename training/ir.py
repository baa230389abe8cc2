"""frozen.pb -> OpenVINO IR (fp32, fp16, int8 via NNCF), and running the IR for checks.

The IR keeps the contract's names: input `input` f32 [1, 299, 299, 3] NHWC (RGB in
[-1, 1]) and output `probabilities` (softmax over the labels). OpenVINO's TensorFlow
frontend would call them `input:0` and `InceptionV3/Predictions/Reshape_1:0`; we
set the tensor names explicitly so the manifest can name them plainly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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

    if not calibration:
        raise ExportError("int8 needs calibration images, and the training split gave none")
    log.info("quantising to int8 with NNCF on %d calibration images", len(calibration))
    try:
        return nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration))
    except Exception as exc:  # NNCF wraps OpenVINO and NumPy errors alike
        raise ExportError(f"NNCF int8 quantisation failed: {exc}") from exc


def save(model: Any, xml: Path, precision: Precision) -> None:
    """Write model.xml + model.bin; fp16 compresses the weights, fp32/int8 keep f32 constants."""
    ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")


class CompiledIR:
    """An IR compiled on the CPU with f32 inference precision."""

    def __init__(self, xml: Path, config: dict[str, str] | None = None) -> None:
        core = ov.Core()
        self.model = core.read_model(str(xml))
        props = dict(F32 if config is None else config)
        self.compiled = core.compile_model(self.model, "CPU", props)
        self._request = self.compiled.create_infer_request()

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
