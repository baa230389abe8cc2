"""`export`: a run -> frozen.pb -> OpenVINO IR -> golden vectors -> signed, verified bundle.

Steps: freeze the eval graph (batch 1) with `convert_variables_to_constants` into
RUN/frozen.pb; convert it with OpenVINO (int8: quantise with NNCF on a calibration
subset of the training split, eval-preprocessed); check that the IR agrees with the
frozen graph run by TensorFlow on the eval split; write golden.npz, the manifest
(metrics, agreement, provenance) and its signature; verify the bundle with
`load_bundle` as a node would; only then rename it into place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cellwatch.shared.bundle import Bundle, hash_files, load_bundle, sha256_file, write_manifest
from cellwatch.shared.manifest import MANIFEST_FILE, GoldenSpec, Manifest
from cellwatch.shared.schemas import ModelName, Version
from cellwatch.shared.signing import TrustedKeys, key_id, load_private_key
from cellwatch.training import LABELS, ir
from cellwatch.training.dataset import ImageEntry
from cellwatch.training.errors import ExportError
from cellwatch.training.evalgraph import EvalGraph, FrozenGraph
from cellwatch.training.evaluate import batches, evaluate, load_metrics
from cellwatch.training.outdir import check_target, staged_dir
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.runinfo import FROZEN_FILE, RANDOM_INIT, RunInfo, load_run
from cellwatch.training.split import SplitFile, SplitName, load_split
from cellwatch.training.tfcompat import versions

log = logging.getLogger(__name__)

GOLDEN_TOLERANCE: dict[ir.Precision, float] = {"fp32": 1e-4, "fp16": 5e-3, "int8": 2e-2}
"""Max |p - expected| the node's self-test allows. Golden probabilities come from the
shipped IR itself at f32 on the CPU, so a node computing in f32 reproduces them to
~1e-6; the margin is for other devices and lower-precision kernels: fp16 weights on a
GPU, int8 kernels on other CPU generations. An fp32 bundle on a node that lets
OpenVINO pick bf16 (recent Xeons) will not meet 1e-4: such nodes must force f32."""
FP32_MAX_DIFF = 1e-4
"""fp32 IR vs frozen.pb (f32 inference): larger means the conversion is wrong."""
GOLDEN_COUNT = 4


class IrAgreement(BaseModel):
    """IR (f32 inference on CPU) vs frozen.pb run by TensorFlow, on the eval split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: SplitName
    n: int = Field(ge=0)
    precision: ir.Precision
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float = Field(ge=0.0, le=1.0)


@dataclass(frozen=True)
class ExportOptions:
    name: str
    version: str
    precision: ir.Precision
    sign_key: Path
    force: bool = False
    eval_split: SplitName = "test"
    calibration_size: int = 300
    low_confidence_threshold: float = 0.6


def export(run: Path, out: Path, options: ExportOptions) -> Bundle:
    """Export run as a signed bundle in out; returns the bundle as load_bundle verified it."""
    _check_names(options)
    info = load_run(run)
    split = load_split(Path(info.split_dir))
    check_target(out, marker=MANIFEST_FILE, force=options.force, what="bundle")
    key = load_private_key(options.sign_key)
    trusted = TrustedKeys({key_id(key.public_key()): key.public_key()})
    if not split.entries(options.eval_split) and split.entries("val"):
        log.warning(
            "the %s split is empty: checking the IR on the val split instead", options.eval_split
        )
        options = replace(options, eval_split="val")
    entries = split.entries(options.eval_split)
    if not entries:
        raise ExportError(f"the {options.eval_split} split is empty: nothing to check the IR on")
    metrics = load_metrics(run, options.eval_split)
    if metrics is None or metrics.checkpoint != info.checkpoint:
        log.info(
            "no evaluation of %s on the %s split yet: evaluating",
            info.checkpoint,
            options.eval_split,
        )
        metrics = evaluate(run, options.eval_split)

    frozen = _freeze(run, info)
    with Preprocessor() as pre:
        inputs = np.concatenate(list(batches(split.root, entries, pre, "eval inputs")))
        calibration = (
            _calibration(split, pre, options.calibration_size, info.config.seed)
            if options.precision == "int8"
            else []
        )
    with FrozenGraph(frozen) as graph:
        reference = graph.predict(inputs)
    model = ir.convert(frozen)
    if options.precision == "int8":
        model = ir.quantize(model, calibration)

    with staged_dir(out, marker=MANIFEST_FILE, force=options.force, what="bundle") as tmp:
        ir.save(model, tmp / "model.xml", options.precision)
        compiled = ir.CompiledIR(tmp / "model.xml")
        probs = compiled.predict(inputs)
        agreement = _agreement(options, reference, probs, len(entries))
        golden = _golden_indices(entries)
        np.savez_compressed(tmp / "golden.npz", inputs=inputs[golden], probabilities=probs[golden])
        manifest = Manifest(
            name=options.name,
            version=options.version,
            created_at=datetime.now(UTC),
            labels=list(LABELS),
            output=compiled.output_name,
            precision=options.precision,
            low_confidence_threshold=options.low_confidence_threshold,
            files=hash_files(tmp),
            metrics={
                "evaluation": metrics.model_dump(mode="json"),
                "ir_agreement": agreement.model_dump(mode="json"),
            },
            provenance=_provenance(run, info, split, frozen, len(calibration)),
            golden=GoldenSpec(tolerance=GOLDEN_TOLERANCE[options.precision]),
        )
        if compiled.input_name != manifest.input.name:  # pragma: no cover - set by ir.convert
            raise ExportError(f"IR input is named {compiled.input_name!r}, not 'input'")
        write_manifest(tmp, manifest, key)
        load_bundle(tmp, trusted)  # as a node would, before the bundle appears
    log.info(
        "bundle %s %s (%s) written to %s%s",
        options.name,
        options.version,
        options.precision,
        out,
        " from SYNTHETIC data" if info.synthetic else "",
    )
    return load_bundle(out, trusted)


def _check_names(options: ExportOptions) -> None:
    try:
        TypeAdapter(ModelName).validate_python(options.name)
        TypeAdapter(Version).validate_python(options.version)
    except ValidationError as exc:
        raise ExportError(
            f"invalid --name or --version ({exc.errors()[0]['input']!r}): use letters, digits "
            "and . _ - (+ also in versions), at most 64 characters"
        ) from exc
    if options.calibration_size < 1:
        raise ExportError("--calibration-size must be at least 1")


def _freeze(run: Path, info: RunInfo) -> Path:
    with EvalGraph(run / info.checkpoint, batch=1) as graph:
        graph_def = graph.freeze()
    path = run / FROZEN_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(graph_def.SerializeToString(deterministic=True))  # reproducible bytes
    tmp.replace(path)
    log.info("froze %s into %s (%d nodes)", info.checkpoint, path, len(graph_def.node))
    return path


def _calibration(split: SplitFile, pre: Preprocessor, size: int, seed: int) -> list[np.ndarray]:
    train = split.entries("train")
    order = np.random.default_rng([seed, 0xCA1]).permutation(len(train))[:size]
    chosen = [train[i] for i in sorted(order)]
    return [x[np.newaxis] for b in batches(split.root, chosen, pre, "calibration") for x in b]


def _agreement(
    options: ExportOptions, reference: np.ndarray, probs: np.ndarray, n: int
) -> IrAgreement:
    diff = np.abs(reference - probs)
    agreement = IrAgreement(
        split=options.eval_split,
        n=n,
        precision=options.precision,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=float(np.mean(reference.argmax(1) == probs.argmax(1))),
    )
    log.info(
        "IR (%s) vs frozen.pb on %d %s images: max |dp| %.2g, top-1 agreement %.3f",
        options.precision,
        n,
        options.eval_split,
        agreement.max_abs_diff,
        agreement.top1_agreement,
    )
    if options.precision == "fp32" and agreement.max_abs_diff > FP32_MAX_DIFF:
        raise ExportError(
            f"fp32 IR differs from frozen.pb by {agreement.max_abs_diff:.3g} "
            f"(> {FP32_MAX_DIFF:g}): the conversion is wrong"
        )
    if agreement.top1_agreement < 1.0:
        log.warning(
            "the %s IR changes the top-1 class of %.1f%% of the %s images",
            options.precision,
            100 * (1 - agreement.top1_agreement),
            options.eval_split,
        )
    return agreement


def _golden_indices(entries: list[ImageEntry]) -> list[int]:
    """Up to GOLDEN_COUNT inputs, alternating classes so both are exercised."""
    by_class = [[i for i, e in enumerate(entries) if e.label == c] for c in range(len(LABELS))]
    chosen: list[int] = []
    while len(chosen) < min(GOLDEN_COUNT, len(entries)):
        for members in by_class:
            if members and len(chosen) < GOLDEN_COUNT:
                chosen.append(members.pop(0))
    return sorted(chosen)


def _provenance(
    run: Path, info: RunInfo, split: SplitFile, frozen: Path, calibration: int
) -> dict[str, Any]:
    base: Any = info.base_checkpoint.model_dump() if info.base_checkpoint else RANDOM_INIT
    return {
        "synthetic": info.synthetic,
        "base_checkpoint": base,
        "data_fingerprint": split.fingerprints["all"],
        "split_fingerprints": split.fingerprints,
        "data_layout": split.layout,
        "mode": info.config.mode,
        "trainable_scopes": info.config.trainable_scopes
        if info.config.mode == "finetune"
        else ["InceptionV3/Logits"],
        "epochs": info.config.epochs,
        "steps": info.steps,
        "seed": info.config.seed,
        "batch_size": info.config.batch_size,
        "learning_rate": info.config.learning_rate,
        "checkpoint": info.checkpoint,
        "frozen_pb_sha256": sha256_file(frozen),
        "calibration_images": calibration,
        "training_versions": info.versions,
        "export_versions": versions(),
        "run": str(run.resolve()),
    }
