"""A small but real OpenVINO model written as a proper signed bundle, for tests.

The network (opset API): NHWC [1,299,299,3] -> two 3x3 convolutions with ReLU and
max-pooling -> global average pool, concatenated with the image's mean colour ->
dense -> softmax over ["normal", "ALL"]. The colour weights dominate, so a reddish
image is classified "ALL" and a bluish one "normal": tests can check a label.
`swap_labels` builds the same network with its two outputs swapped: a candidate that
disagrees with the toy on every image (the shadow phase's tests).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from cellwatch.shared.bundle import hash_files, write_manifest
from cellwatch.shared.drift import DriftReference
from cellwatch.shared.manifest import MODEL_CARD_FILE, Decision, GoldenSpec, Manifest
from cellwatch.shared.signing import generate_keypair, load_private_key

LABELS = ["normal", "ALL"]
SIZE = 299


def build_model(seed: int = 0, swap_labels: bool = False) -> ov.Model:
    rng = np.random.default_rng(seed)
    x = ops.parameter([1, SIZE, SIZE, 3], np.float32, name="input")
    nchw = ops.transpose(x, ops.constant(np.array([0, 3, 1, 2], dtype=np.int64)))
    w1 = ops.constant(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32))
    c1 = ops.relu(ops.convolution(nchw, w1, [2, 2], [0, 0], [0, 0], [1, 1]))
    p1 = ops.max_pool(c1, [2, 2], [1, 1], [0, 0], [0, 0], [3, 3]).output(0)
    w2 = ops.constant(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32))
    c2 = ops.relu(ops.convolution(p1, w2, [2, 2], [0, 0], [0, 0], [1, 1]))
    pooled = ops.reduce_mean(c2, ops.constant(np.array([2, 3], dtype=np.int64)), False)
    colour = ops.reduce_mean(nchw, ops.constant(np.array([2, 3], dtype=np.int64)), False)
    feats = ops.concat([pooled, colour], 1)
    w = np.zeros((11, 2), dtype=np.float32)
    w[:8] = rng.normal(0, 0.05, (8, 2))
    w[8] = [-4.0, 4.0]  # red pushes towards ALL
    w[10] = [4.0, -4.0]  # blue pushes towards normal
    if swap_labels:
        w = np.ascontiguousarray(w[:, ::-1])
    logits = ops.add(
        ops.matmul(feats, ops.constant(w), False, False),
        ops.constant(np.zeros((1, 2), dtype=np.float32)),
    )
    probs = ops.softmax(logits, 1)
    probs.output(0).get_tensor().set_names({"probabilities"})
    return ov.Model([probs], [x], "cellwatch-test")


def write_test_bundle(
    out: Path,
    key_dir: Path,
    *,
    name: str = "toy",
    version: str = "1.0.0",
    seed: int = 0,
    sign: bool = True,
    key_name: str = "test",
    golden_shift: float = 0.0,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    decision: Decision | None = None,
    model_card: str | None = None,
    swap_labels: bool = False,
    reference: DriftReference | None = None,
) -> Path:
    """Write a signed bundle of the toy model into out (created); keys into key_dir."""
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(seed, swap_labels)
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    compiled = ov.Core().compile_model(
        str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    rng = np.random.default_rng(seed + 1)
    inputs = rng.uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    probs = np.stack([compiled({0: x[np.newaxis]})[0][0] for x in inputs]).astype(np.float32)
    if golden_shift:  # a bundle whose golden vectors this model does not reproduce
        probs = np.clip(probs + np.array([golden_shift, -golden_shift], np.float32), 0, 1)
    np.savez_compressed(out / "golden.npz", inputs=inputs, probabilities=probs)
    if model_card is not None:
        (out / MODEL_CARD_FILE).write_text(model_card)
    manifest = Manifest(
        name=name,
        version=version,
        created_at=datetime.now(UTC),
        labels=LABELS,
        output="probabilities",
        precision="fp32",
        low_confidence_threshold=0.6,
        files=hash_files(out),
        metrics=metrics if metrics is not None else {"note": "toy test model, not trained"},
        # Hand-set weights, trained on nothing: the provenance says neither `synthetic` nor
        # `base_checkpoint`, so the toy is not flagged (tests of the flags pass their own).
        provenance=provenance if provenance is not None else {"builder": "tests/models.py"},
        golden=GoldenSpec(tolerance=1e-3),
        decision=decision,
        reference=reference,
    )
    key = None
    if sign:
        key_path = key_dir / f"{key_name}.key"
        if not key_path.exists():
            generate_keypair(key_dir, key_name)
        key = load_private_key(key_path)
    write_manifest(out, manifest, key)
    return out
