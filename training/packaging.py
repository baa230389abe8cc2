"""Export's stage 8: what a bundle carries beside the model, and its signature.

Golden probes for the node's self-test (probes.py: noise and synthetic smears, no patient
data), the drift reference (the deployed IR on the validation split: shared/drift.py), the
provenance of the run, and the manifest, signed and verified as a node would verify it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellwatch.node.decode import check_payload
from cellwatch.node.engine import LOW_PRECISION_TOLERANCE
from cellwatch.node.preprocess import PIXEL_OFFSET, PIXEL_SCALE
from cellwatch.shared.bundle import hash_files, load_bundle, sha256_file, write_manifest
from cellwatch.shared.drift import DriftReference, reference_of
from cellwatch.shared.figures import BundleMetrics
from cellwatch.shared.manifest import (
    Calibration,
    Decision,
    GoldenSpec,
    Manifest,
)
from cellwatch.shared.provenance import Provenance
from cellwatch.training import LABELS, ir, probes
from cellwatch.training.dataset import LIMITS
from cellwatch.training.errors import ExportError
from cellwatch.training.measure import (
    Candidate,
    Inputs,
)
from cellwatch.training.runinfo import (
    code_commit,
)
from cellwatch.training.tfcompat import versions

if TYPE_CHECKING:
    from cellwatch.training.export import ExportOptions, Plan

log = logging.getLogger(__name__)

GOLDEN_TOLERANCE: dict[ir.Precision, float] = {"fp32": 1e-4, "fp16": 5e-3, "int8": 2e-2}
"""Max |p - expected| the node's self-test allows. Golden probabilities come from the
shipped IR itself at f32 on the CPU, so a node computing in f32 reproduces them to
~1e-6; the margin is for other devices and lower-precision kernels: fp16 weights on a
GPU, int8 kernels on other CPU generations. An fp32 bundle on a node that lets
OpenVINO pick bf16 (recent Xeons) will not meet 1e-4: such nodes must force f32."""
PROBE_STABILITY = LOW_PRECISION_TOLERANCE / 2
"""Golden probes must reproduce within this at the CPU's default inference precision:
half the node's self-test tolerance for such devices, a margin for other CPUs."""


def golden_probes(tmp: Path, decision: Decision, precision: ir.Precision) -> GoldenSpec:
    """Stage 8a: golden probes of the saved IR, stable at the CPU's default precision."""
    golden_ir = ir.CompiledIR(tmp / "model.xml")
    deployed_ir = ir.CompiledIR(tmp / "model.xml", ir.DEVICE_DEFAULT)
    probe_inputs, _ = probes.golden_probes(
        golden_ir.predict,
        probes.stability(golden_ir.predict, deployed_ir.predict, PROBE_STABILITY),
        threshold=decision.threshold,
        positive=LABELS.index(decision.positive_label),
    )
    np.savez_compressed(
        tmp / "golden.npz", inputs=probe_inputs, probabilities=golden_ir.predict(probe_inputs)
    )
    if golden_ir.input_name != "input" or golden_ir.output_name != "probabilities":
        raise ExportError(  # pragma: no cover - set by ir.convert
            f"IR names {golden_ir.input_name!r} -> {golden_ir.output_name!r}, not "
            "'input' -> 'probabilities'"
        )
    return GoldenSpec(tolerance=GOLDEN_TOLERANCE[precision], inputs=probes.DESCRIPTION)


def drift_reference(
    plan: Plan, inputs: Inputs, chosen: Candidate, decision: Decision
) -> DriftReference | None:
    """Stage 8b: the drift reference, the deployed IR (at the CPU's default precision, as
    a node runs it) on the validation split: what every node compares its live images
    with. None without validation images (nodes then say `no reference`)."""
    if inputs.val is None:
        log.warning("no validation images: the bundle carries no drift reference")
        return None
    entries = plan.split.entries("val")
    p = chosen.deployed[inputs.val][:, 1].astype(np.float64)
    positive = LABELS.index(decision.positive_label)
    lo, hi = decision.low_confidence
    sizes = []
    for e in entries:
        head = check_payload((plan.split.root / e.path).read_bytes(), LIMITS)
        sizes.append(head.width * head.height / 1e6)
    pixels = np.clip(np.rint((inputs.every[inputs.val] + PIXEL_OFFSET) * PIXEL_SCALE), 0, 255)
    reference = reference_of(
        positive_prob=p,
        labels=LABELS,
        predicted=np.where(p >= decision.threshold, positive, 1 - positive),
        low=(p >= lo) & (p <= hi),
        megapixels=np.array(sizes, np.float64),
        pixels=pixels.astype(np.uint8),
        positive_label=decision.positive_label,
    )
    log.info(
        "drift reference: %d validation images, %s predicted, %d in the low-confidence band",
        reference.n,
        ", ".join(f"{k} {v}" for k, v in reference.labels.items()),
        reference.low_confidence,
    )
    return reference


def sign(
    tmp: Path,
    plan: Plan,
    options: ExportOptions,
    metrics: BundleMetrics,
    provenance: Provenance,
    calibration: Calibration,
    decision: Decision,
    golden: GoldenSpec,
    reference: DriftReference | None,
) -> None:
    """Stage 8c: the manifest, signed, and the bundle verified as a node would."""
    lo, hi = decision.low_confidence
    manifest = Manifest(
        name=options.name,
        version=options.version,
        created_at=datetime.now(UTC),
        labels=list(LABELS),
        output="probabilities",
        precision=options.precision,
        low_confidence_threshold=max(hi, 1.0 - lo),
        files=hash_files(tmp),
        metrics=metrics,
        provenance=provenance,
        golden=golden,
        calibration=calibration,
        decision=decision,
        reference=reference,
    )
    write_manifest(tmp, manifest, plan.key)
    load_bundle(tmp, plan.trusted)  # as a node would, before the bundle appears


def provenance_of(plan: Plan, frozen: Path, calibration: int, options: ExportOptions) -> Provenance:
    info, split = plan.info, plan.split
    base = info.base_checkpoint
    return Provenance(
        synthetic=info.synthetic,
        base_checkpoint=base.path if base else None,
        base_checkpoint_sha256=base.sha256 if base else None,
        base_verified=plan.base.verified,
        base_published=plan.base.published,
        base_claim=plan.base.claim,
        depth_multiplier=info.config.depth_multiplier,
        allow_untrained=options.allow_untrained,
        allow_no_test=options.allow_no_test,
        allow_no_skill=options.allow_no_skill,
        data_fingerprint=split.fingerprints["all"],
        split_fingerprints=split.fingerprints,
        data_layout=split.layout,
        grouping=split.grouping,
        near_duplicates=len(split.near_duplicates),
        split_seed=split.seed,
        val_fraction=split.val_fraction,
        test_fraction=split.test_fraction,
        fold=info.config.fold,
        mode=info.config.mode,
        trainable_scopes=info.config.trainable_scopes
        if info.config.mode == "finetune"
        else ["InceptionV3/Logits"],
        epochs=info.config.epochs,
        selected_epoch=info.selected_epoch,
        selection=info.selection,
        steps=info.steps,
        seed=info.config.seed,
        batch_size=info.config.batch_size,
        learning_rate=info.config.learning_rate,
        lr_schedule=info.config.lr_schedule,
        checkpoint=info.checkpoint,
        frozen_pb_sha256=sha256_file(frozen),
        calibration_images=calibration,
        test_reads=len(info.test_reads),
        code_commit=code_commit(),
        training_versions=info.versions,
        export_versions=versions(),
        run=str(plan.run.resolve()),
    )
