"""Golden vectors without patient data still pin the model: the node's self-test fails
when a single weight tensor of the shipped IR changes, at f32 and at the device's
default precision."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from cellwatch.node.engine import EngineConfig, load_serving_model
from cellwatch.node.errors import SelfTestError
from cellwatch.shared.bundle import hash_files, load_bundle, write_manifest
from cellwatch.shared.signing import TrustedKeys, load_private_key

pytestmark = pytest.mark.slow


def edited(bundle: Path, out: Path, key: Path, change: Callable[[ov.Model], None]) -> Path:
    """A copy of bundle whose IR has `change` applied, re-hashed and signed again (what a
    corrupted or tampered model file signed by a trusted key would look like)."""
    shutil.copytree(bundle, out)
    model = ov.Core().read_model(str(bundle / "model.xml"))  # model.bin is mapped: not out's
    change(model)
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    manifest = load_bundle(bundle, TrustedKeys({}), allow_unsigned=True).manifest
    write_manifest(
        out, manifest.model_copy(update={"files": hash_files(out)}), load_private_key(key)
    )
    return out


def replace_constant(
    model: ov.Model, pick: Callable[[ov.Node], bool], f: Callable[[np.ndarray], np.ndarray]
) -> None:
    found = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and pick(op)]
    assert len(found) == 1, [op.get_friendly_name() for op in found]
    old = found[0]
    new = ov.op.Constant(np.ascontiguousarray(f(old.get_data().copy()), dtype=np.float32))
    for target in list(old.output(0).get_target_inputs()):
        target.replace_source_output(new.output(0))


def first_conv(op: ov.Node) -> bool:
    shape = tuple(op.get_output_shape(0))
    # the only convolution that reads 3 channels (32 filters at full width, 16 at TEST_DEPTH)
    return len(shape) == 4 and shape[1] == 3 and op.get_element_type() == ov.Type.f32


def head_bias(op: ov.Node) -> bool:
    size = int(np.prod(op.get_output_shape(0)))
    consumers = {t.get_node().get_type_name() for t in op.output(0).get_target_inputs()}
    return size == 2 and op.get_element_type() == ov.Type.f32 and consumers == {"Add"}


def test_a_changed_weight_fails_the_self_test(
    bundle: Callable[[str], Path], signing_key: Path, tmp_path: Path
) -> None:
    original = bundle("fp32")
    trusted = TrustedKeys.load(signing_key.parent)
    core = ov.Core()
    f32 = EngineConfig(performance_hint="latency", infer_requests=1, force_f32=True)
    default = EngineConfig(performance_hint="latency", infer_requests=1)
    for config in (f32, default):
        load_serving_model(core, load_bundle(original, trusted), config)  # passes as shipped

    # 1% on the first convolution: invisible to a glance, fatal to the f32 self-test
    nudged = edited(
        original,
        tmp_path / "nudged",
        signing_key,
        lambda m: replace_constant(m, first_conv, lambda w: w * 1.01),
    )
    with pytest.raises(SelfTestError, match="self-test failed"):
        load_serving_model(core, load_bundle(nudged, trusted), f32)

    # one logit shifted by 1: caught even at the device's reduced default precision
    shifted = edited(
        original,
        tmp_path / "shifted",
        signing_key,
        lambda m: replace_constant(
            m, head_bias, lambda b: b + np.array([0.0, 1.0]).reshape(b.shape)
        ),
    )
    for config in (f32, default):
        with pytest.raises(SelfTestError, match="self-test failed"):
            load_serving_model(core, load_bundle(shifted, trusted), config)
