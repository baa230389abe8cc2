"""The compiled model takes the node's uint8 pixels: the conversion to the model's
range that OpenVINO does inside it is the node's (and training's) arithmetic, and
the self-test holds the served model to the IR as shipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from cellwatch.node import engine
from cellwatch.node.decode import ImageLimits, decode_image
from cellwatch.node.engine import EngineConfig, load_serving_model, with_pixel_input
from cellwatch.node.errors import SelfTestError
from cellwatch.node.preprocess import crop_and_resize, preprocess, to_model_range
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.manifest import PreprocessingSpec
from cellwatch.shared.signing import TrustedKeys
from tests import images

F32 = EngineConfig(force_f32=True, infer_requests=1, performance_hint="latency")


def test_pixel_input_converts_exactly_as_the_node_did() -> None:
    """An identity model shows the floats OpenVINO computes from the pixels: those of
    `to_model_range` (training's arithmetic), to float32 rounding."""
    x = ops.parameter([1, 299, 299, 3], np.float32, name="input")
    identity = ov.Model([ops.multiply(x, ops.constant(np.float32(1.0)))], [x], "identity")
    compiled = ov.Core().compile_model(
        with_pixel_input(identity), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    assert compiled.input(0).get_element_type() == ov.Type.u8
    pixels = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    pixels[0, 0, 0] = [0, 255, 128]
    got = compiled(pixels)[0]
    want = to_model_range(pixels)
    assert np.max(np.abs(got - want)) <= 1e-6
    # 0 and 255 map to -1 and 1 (OpenVINO may fuse multiply and add: 1 ulp apart)
    assert abs(float(got.min()) + 1.0) <= 1e-6 and abs(float(got.max()) - 1.0) <= 1e-6


def test_served_model_on_pixels_equals_the_ir_on_preprocessed_floats(
    toy_bundle: tuple[Path, Path],
) -> None:
    bundle = load_bundle(toy_bundle[0], TrustedKeys.load(toy_bundle[1]))
    model = load_serving_model(ov.Core(), bundle, F32)
    spec = PreprocessingSpec()
    ir = ov.Core().compile_model(
        str(bundle.file("model.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    for payload in (images.jpeg(), images.jpeg(images.BLUE, h=1944, w=2592), images.png()):
        rgb = decode_image(payload, ImageLimits())
        served = model.infer(crop_and_resize(rgb, spec))
        want = np.asarray(ir(preprocess(rgb, spec))[0]).reshape(-1)
        np.testing.assert_allclose(served, want, atol=1e-5)


def test_self_test_refuses_a_served_model_whose_pixel_input_differs(
    toy_bundle: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The golden vectors pass on the IR; the served model (the IR with the pixel
    conversion folded in) is held to the IR on the same images as 8-bit pixels."""
    bundle = load_bundle(toy_bundle[0], TrustedKeys.load(toy_bundle[1]))
    assert load_serving_model(ov.Core(), bundle, F32).self_test() < 1e-4
    monkeypatch.setattr(engine, "PIXEL_OFFSET", 0.0)  # a conversion that is off
    with pytest.raises(SelfTestError, match="pixel input differs from the IR"):
        load_serving_model(ov.Core(), bundle, F32)
