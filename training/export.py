"""`export`: a run -> calibrated frozen.pb -> OpenVINO IR -> gate -> signed, verified bundle.

Steps, cheapest checks first:
1. The run must still match its split (fingerprints), must have a base checkpoint
   (or --allow-untrained), and the test split must not be empty (or --allow-no-test,
   which measures on the validation split and says so everywhere).
2. Calibration on the validation split (calibration.py): temperature fit, kept only if
   it does not worsen ECE; decision threshold and low-confidence band chosen for the
   target sensitivity. Written to RUN/calibration/ with a reliability diagram.
3. Freeze the eval graph with the temperature folded into the final convolution
   (RUN/frozen.pb); convert it with OpenVINO; fp16 compresses the weights; int8 is NNCF
   post-training quantisation on training images, and, if that misses the gate,
   accuracy-aware quantisation validated on the validation split.
4. Run the IR itself on the test split with OpenVINO, at the device's default inference
   precision ("deployed") and forced to f32, and frozen.pb in TensorFlow; all three
   sets of figures, with intervals, go into the manifest (bundle_metrics.py).
5. The gate (gate.py): decisions that agree with TensorFlow's and no sensitivity lost;
   otherwise GateError (exit code 3) unless --allow-degraded, which is recorded.
6. Golden probes (probes.py: noise and synthetic smears, no patient data), the model
   card, the manifest and its signature; `load_bundle` verifies the bundle as a node
   would before it is renamed into place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import TypeAdapter, ValidationError

from cellwatch.node.engine import LOW_PRECISION_TOLERANCE
from cellwatch.shared.bundle import Bundle, hash_files, load_bundle, sha256_file, write_manifest
from cellwatch.shared.manifest import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Calibration,
    Decision,
    GoldenSpec,
    Manifest,
)
from cellwatch.shared.schemas import ModelName, Version
from cellwatch.shared.signing import TrustedKeys, key_id, load_private_key
from cellwatch.training import LABELS, ir, plots, probes
from cellwatch.training.bundle_metrics import (
    BundleMetrics,
    Deployed,
    Parity,
    Reference,
    machine_name,
)
from cellwatch.training.calibration import (
    DEFAULT_BAND_HALF_WIDTH,
    DEFAULT_TARGET_SENSITIVITY,
    calibrate,
    choose_decision,
    reliability,
    softmax,
)
from cellwatch.training.dataset import ImageEntry
from cellwatch.training.errors import ExportError
from cellwatch.training.evalgraph import EvalGraph, FrozenGraph
from cellwatch.training.evaluate import batches, predict_logits
from cellwatch.training.gate import DEFAULT_MAX_DROP, DEFAULT_MIN_AGREEMENT, Gate, GateError, judge
from cellwatch.training.modelcard import CardFacts, render
from cellwatch.training.outdir import check_target, staged_dir
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.runinfo import (
    FROZEN_FILE,
    RunInfo,
    load_run,
    load_run_split,
    record_test_read,
    write_json,
)
from cellwatch.training.split import SplitFile, SplitName
from cellwatch.training.stats import MetricSet, agreement, fmt, metric_set
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
PROBE_STABILITY = LOW_PRECISION_TOLERANCE / 2
"""Golden probes must reproduce within this at the CPU's default inference precision:
half the node's self-test tolerance for such devices, a margin for other CPUs."""
CALIBRATION_DIR = "calibration"
CALIBRATION_FILE = "calibration.json"
Int8Method = Literal["auto", "ptq", "accuracy-control"]


@dataclass(frozen=True)
class ExportOptions:
    name: str
    version: str
    precision: ir.Precision
    sign_key: Path
    force: bool = False
    calibration_size: int = 300
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_drop: float = DEFAULT_MAX_DROP
    allow_degraded: bool = False
    allow_untrained: bool = False
    allow_no_test: bool = False
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    band_half_width: float = DEFAULT_BAND_HALF_WIDTH
    threshold: float | None = None
    """A fixed decision threshold instead of one chosen on validation."""
    int8_method: Int8Method = "auto"
    """auto: accuracy control only when plain quantisation misses the gate; ptq: plain
    post-training quantisation only; accuracy-control: always (plain quantisation is
    still measured, for the record)."""


@dataclass
class Candidate:
    """One converted model, measured on the eval split."""

    method: str
    model: Any
    xml: Path
    deployed: np.ndarray
    f32: np.ndarray
    inference_precision: str
    metrics: MetricSet
    agreement_k: int
    gate: Gate
    seconds: float


def export(run: Path, out: Path, options: ExportOptions) -> Bundle:
    """Export run as a signed bundle in out; returns the bundle as load_bundle verified it."""
    _check_options(options)
    info = load_run(run)
    split = load_run_split(run, info)
    if info.base_checkpoint is None and not options.allow_untrained:
        raise ExportError(
            f"{run} was trained from RANDOM weights (no --checkpoint): it has learnt nothing "
            "from ImageNet; refit with --checkpoint inception_v3.ckpt, or pass "
            "--allow-untrained to export it anyway (it is then labelled untrained)"
        )
    check_target(out, marker=MANIFEST_FILE, force=options.force, what="bundle")
    key = load_private_key(options.sign_key)
    trusted = TrustedKeys({key_id(key.public_key()): key.public_key()})
    eval_split: SplitName = "test"
    if not split.entries("test"):
        if not options.allow_no_test:
            raise ExportError(
                f"the test split of {info.split_dir} is empty: the bundle's figures need "
                "held-out images (prepare with --test > 0), or pass --allow-no-test to "
                "measure on the validation split instead (recorded as such)"
            )
        if not split.entries("val"):
            raise ExportError("the test and validation splits are both empty: nothing to measure")
        log.warning("the test split is empty: measuring on the VALIDATION split (--allow-no-test)")
        eval_split = "val"
    entries = split.entries(eval_split)
    y_eval = np.array([e.label for e in entries], np.int64)

    calibration, decision, val_probs = _calibrate(run, info, split, options)
    frozen = _freeze(run, info, calibration)
    with Preprocessor() as pre:
        inputs = np.concatenate(list(batches(split.root, entries, pre, "eval inputs")))
        val_inputs = _inputs(split, split.entries("val"), pre, "validation inputs")
        calibration_set = (
            _calibration_set(split, pre, options.calibration_size, info.config.seed)
            if options.precision == "int8"
            else []
        )
    with FrozenGraph(frozen) as graph:
        reference = graph.predict(inputs)
    info = record_test_read(run, "export", eval_split, len(entries))
    threshold = decision.threshold
    tf_metrics = metric_set(y_eval, reference[:, 1], threshold)

    def measure(method: str, model: Any, xml: Path, started: float) -> Candidate:
        ir.save(model, xml, options.precision)
        deployed_ir = ir.CompiledIR(xml, ir.DEVICE_DEFAULT)
        deployed = deployed_ir.predict(inputs)
        f32 = ir.CompiledIR(xml).predict(inputs)
        metrics = metric_set(y_eval, deployed[:, 1], threshold)
        agree = agreement(deployed[:, 1] >= threshold, reference[:, 1] >= threshold)
        gate = judge(
            agree,
            tf_metrics,
            metrics,
            min_agreement=options.min_agreement,
            max_drop=options.max_drop,
        )
        seconds = time.perf_counter() - started
        log.info(
            "%s %s IR on %d %s images (%s): agreement with TensorFlow %s, sensitivity %s, "
            "gate %s (%.1f s)",
            options.precision,
            method,
            len(entries),
            eval_split,
            deployed_ir.inference_precision,
            fmt(agree),
            fmt(metrics.sensitivity),
            "passed" if gate.passed else "FAILED: " + "; ".join(gate.failures()),
            seconds,
        )
        return Candidate(
            method,
            model,
            xml,
            deployed,
            f32,
            deployed_ir.inference_precision,
            metrics,
            agree.k,
            gate,
            seconds,
        )

    with staged_dir(out, marker=MANIFEST_FILE, force=options.force, what="bundle") as tmp:
        started = time.perf_counter()
        model = ir.convert(frozen)
        tried: list[Candidate] = []
        if options.precision == "int8":
            model = ir.quantize(model, calibration_set)
            method = "post-training quantisation (NNCF)"
        else:
            method = "conversion"
        chosen = measure(method, model, tmp / "model.xml", started)
        tried.append(chosen)
        wants_control = options.int8_method == "accuracy-control" or (
            options.int8_method == "auto" and not chosen.gate.passed
        )
        if options.precision == "int8" and wants_control:
            if val_inputs is None:
                log.warning("no validation split: accuracy-aware quantisation is not possible")
            else:
                started = time.perf_counter()
                controlled = ir.quantize_with_accuracy_control(
                    ir.convert(frozen),
                    calibration_set,
                    [x[np.newaxis] for x in val_inputs],
                    _agreement_metric(val_probs[:, 1], threshold),
                    max_drop=1.0 - options.min_agreement,
                )
                chosen = measure(
                    "accuracy-aware quantisation (NNCF)", controlled, tmp / "model.xml", started
                )
                tried.append(chosen)
        gate = chosen.gate
        if not gate.passed:
            figures = "; ".join(gate.failures())
            if not options.allow_degraded:
                raise GateError(
                    f"the {options.precision} model fails the export gate on {len(entries)} "
                    f"{eval_split} images: {figures}; nothing was written (try another "
                    "--precision, or --allow-degraded to ship it labelled degraded)"
                )
            log.warning("exporting a DEGRADED model (--allow-degraded): %s", figures)
            gate = gate.model_copy(update={"overridden": True})
        if options.precision == "fp32":
            worst = float(np.abs(chosen.f32 - reference).max())
            if worst > FP32_MAX_DIFF:
                raise ExportError(
                    f"fp32 IR differs from frozen.pb by {worst:.3g} (> {FP32_MAX_DIFF:g}): "
                    "the conversion is wrong"
                )
        bundle_metrics = BundleMetrics(
            split=eval_split,
            n=len(entries),
            split_fingerprint=split.fingerprints[eval_split],
            deployed=Deployed(
                precision=options.precision,
                device=ir.CompiledIR.device,
                inference_precision=chosen.inference_precision,
                machine=machine_name(),
                metrics=chosen.metrics,
            ),
            f32=Reference(metrics=metric_set(y_eval, chosen.f32[:, 1], threshold)),
            tensorflow=Reference(metrics=tf_metrics),
            agreement=agreement(chosen.deployed[:, 1] >= threshold, reference[:, 1] >= threshold),
            parity=Parity(
                max_abs_diff_f32=float(np.abs(chosen.f32 - reference).max()),
                max_abs_diff_deployed=float(np.abs(chosen.deployed - reference).max()),
            ),
        )
        golden_ir = ir.CompiledIR(tmp / "model.xml")
        deployed_ir = ir.CompiledIR(tmp / "model.xml", ir.DEVICE_DEFAULT)
        probe_inputs, _ = probes.golden_probes(
            golden_ir.predict,
            probes.stability(golden_ir.predict, deployed_ir.predict, PROBE_STABILITY),
            threshold=threshold,
            positive=LABELS.index(decision.positive_label),
        )
        np.savez_compressed(
            tmp / "golden.npz", inputs=probe_inputs, probabilities=golden_ir.predict(probe_inputs)
        )
        provenance = _provenance(run, info, split, frozen, len(calibration_set), options)
        provenance["gate"] = gate.model_dump(mode="json")
        provenance["quantization"] = _quantization(options, tried)
        (tmp / MODEL_CARD_FILE).write_text(
            render(
                CardFacts(
                    name=options.name,
                    version=options.version,
                    labels=list(LABELS),
                    metrics=bundle_metrics,
                    calibration=calibration,
                    decision=decision,
                    gate=gate,
                    provenance=provenance,
                    split=split,
                    golden=probes.DESCRIPTION,
                )
            )
        )
        lo, hi = decision.low_confidence
        manifest = Manifest(
            name=options.name,
            version=options.version,
            created_at=datetime.now(UTC),
            labels=list(LABELS),
            output=golden_ir.output_name,
            precision=options.precision,
            low_confidence_threshold=max(hi, 1.0 - lo),
            files=hash_files(tmp),
            metrics=bundle_metrics.model_dump(mode="json"),
            provenance=provenance,
            golden=GoldenSpec(
                tolerance=GOLDEN_TOLERANCE[options.precision], inputs=probes.DESCRIPTION
            ),
            calibration=calibration,
            decision=decision,
        )
        if golden_ir.input_name != manifest.input.name:  # pragma: no cover - set by ir.convert
            raise ExportError(f"IR input is named {golden_ir.input_name!r}, not 'input'")
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


def _check_options(options: ExportOptions) -> None:
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
    for flag, value in (
        ("--min-agreement", options.min_agreement),
        ("--max-drop", options.max_drop),
        ("--target-sensitivity", options.target_sensitivity),
        ("--threshold", 0.5 if options.threshold is None else options.threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise ExportError(f"{flag} must be between 0 and 1, not {value:g}")
    if not 0.0 <= options.band_half_width < 0.5:
        raise ExportError(f"--band-half-width must be in [0, 0.5), not {options.band_half_width:g}")


def _calibrate(
    run: Path, info: RunInfo, split: SplitFile, options: ExportOptions
) -> tuple[Calibration, Decision, np.ndarray]:
    """Temperature, decision rule and calibrated validation probabilities; RUN/calibration/."""
    val = split.entries("val")
    y = np.array([e.label for e in val], np.int64)
    logits = (
        predict_logits(run, info, val, "validation logits")
        if val
        else np.zeros((0, len(LABELS)), np.float32)
    )
    calibration = calibrate(logits, y)
    if calibration.note:
        log.warning("calibration: %s", calibration.note)
    scale = 1.0 / calibration.temperature if calibration.applied else 1.0
    probs = softmax(logits * scale) if len(val) else np.zeros((0, len(LABELS)))
    decision = choose_decision(
        probs[:, 1],
        y,
        positive_label=LABELS[1],
        target_sensitivity=options.target_sensitivity,
        half_width=options.band_half_width,
        threshold=options.threshold,
    )
    log.info(
        "calibration on %d validation images: T %.3g (%s), ECE %s -> %s; threshold %.3f, "
        "low-confidence band [%.3f, %.3f]",
        len(val),
        calibration.temperature,
        "applied" if calibration.applied else "NOT applied",
        _num(calibration.ece_before),
        _num(calibration.ece_after),
        decision.threshold,
        *decision.low_confidence,
    )
    out = run / CALIBRATION_DIR
    with staged_dir(out, marker=CALIBRATION_FILE, force=True, what="calibration") as tmp:
        write_json(tmp / CALIBRATION_FILE, calibration)
        (tmp / "decision.json").write_text(decision.model_dump_json(indent=2) + "\n")
        if len(val):
            raw = softmax(logits)[:, 1]
            plots.reliability(
                reliability(raw, y),
                reliability(softmax(logits / calibration.temperature)[:, 1], y),
                tmp / "reliability.png",
                title=f"validation split, n={len(val)}",
                synthetic=info.synthetic,
                after_label=f"T={calibration.temperature:.3g}"
                + ("" if calibration.applied else " (worse: NOT applied)"),
            )
    return calibration, decision, probs


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _freeze(run: Path, info: RunInfo, calibration: Calibration) -> Path:
    with EvalGraph(run / info.checkpoint, batch=1) as graph:
        if calibration.applied:
            graph.scale_logits(1.0 / calibration.temperature)
        graph_def = graph.freeze()
    path = run / FROZEN_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(graph_def.SerializeToString(deterministic=True))  # reproducible bytes
    tmp.replace(path)
    log.info("froze %s into %s (%d nodes)", info.checkpoint, path, len(graph_def.node))
    return path


def _inputs(
    split: SplitFile, entries: list[ImageEntry], pre: Preprocessor, what: str
) -> np.ndarray | None:
    if not entries:
        return None
    return np.concatenate(list(batches(split.root, entries, pre, what)))


def _calibration_set(split: SplitFile, pre: Preprocessor, size: int, seed: int) -> list[np.ndarray]:
    train = split.entries("train")
    order = np.random.default_rng([seed, 0xCA1]).permutation(len(train))[:size]
    chosen = [train[i] for i in sorted(order)]
    return [x[np.newaxis] for b in batches(split.root, chosen, pre, "calibration") for x in b]


def _agreement_metric(reference: np.ndarray, threshold: float) -> Callable[[np.ndarray], float]:
    """NNCF's validation metric: the share of validation decisions equal to TensorFlow's
    (reference: TensorFlow's p(ALL) on the validation split)."""

    def metric(probs: np.ndarray) -> float:
        return float(np.mean((probs[:, 1] >= threshold) == (reference >= threshold)))

    return metric


def _quantization(options: ExportOptions, tried: list[Candidate]) -> dict[str, Any]:
    if options.precision != "int8":
        return {"method": None}
    return {
        "method": tried[-1].method,
        "int8_method": options.int8_method,
        "attempts": [
            {
                "method": c.method,
                "agreement": c.gate.agreement,
                "agreement_k": c.agreement_k,
                "n": c.metrics.n,
                "sensitivity_drop": c.gate.sensitivity_drop,
                "deployed": c.metrics.model_dump(mode="json"),
                "passed": c.gate.passed,
                "seconds": round(c.seconds, 1),
            }
            for c in tried
        ],
    }


def _provenance(
    run: Path,
    info: RunInfo,
    split: SplitFile,
    frozen: Path,
    calibration: int,
    options: ExportOptions,
) -> dict[str, Any]:
    base = info.base_checkpoint
    return {
        "synthetic": info.synthetic,
        "base_checkpoint": base.path if base else None,
        "base_checkpoint_sha256": base.sha256 if base else None,
        "allow_untrained": options.allow_untrained,
        "allow_no_test": options.allow_no_test,
        "data_fingerprint": split.fingerprints["all"],
        "split_fingerprints": split.fingerprints,
        "data_layout": split.layout,
        "grouping": split.grouping,
        "near_duplicates": len(split.near_duplicates),
        "fold": info.config.fold,
        "mode": info.config.mode,
        "trainable_scopes": info.config.trainable_scopes
        if info.config.mode == "finetune"
        else ["InceptionV3/Logits"],
        "epochs": info.config.epochs,
        "selected_epoch": info.selected_epoch,
        "selection": info.selection,
        "steps": info.steps,
        "seed": info.config.seed,
        "batch_size": info.config.batch_size,
        "learning_rate": info.config.learning_rate,
        "lr_schedule": info.config.lr_schedule,
        "checkpoint": info.checkpoint,
        "frozen_pb_sha256": sha256_file(frozen),
        "calibration_images": calibration,
        "test_reads": len(info.test_reads),
        "training_versions": info.versions,
        "export_versions": versions(),
        "run": str(run.resolve()),
    }
