"""`export`: a run -> calibrated frozen.pb -> OpenVINO IR -> gates -> signed, verified bundle.

The stages, cheapest checks first (each one function, here or in the module named):
1. plan: the options; the run must still match its split (each image's fingerprint
   recomputed), have a base checkpoint (or --allow-untrained) whose hash is the
   published file's (or --base-is), and a non-empty test split (or --allow-no-test,
   which measures on the validation split and says so everywhere).
2. calibrate on the validation split (calibrated.calibrate_run, under calibration.py's
   rule: temperature only with evidence; decision threshold and low-confidence band
   for the target sensitivity), written to RUN/calibration/ with a reliability diagram.
3. freeze the eval graph with the temperature folded into the final convolution
   (calibrated.freeze: RUN/frozen.pb).
4. inputs: every image preprocessed, and frozen.pb's probabilities of them
   (measure.py).
5. quality floor (quality.py) on the eval split: evidence of skill, or QualityError
   (exit code 3) unless --allow-no-skill; calibration checked on the eval split.
6. convert with OpenVINO; fp16 compresses the weights; int8 is NNCF post-training
   quantisation on training images and, when that misses the gate on the
   validation split (auto), accuracy-aware quantisation validated there.
7. the fidelity gate (gate.py) on every image; GateError (exit code 3) unless
   --allow-degraded, which is recorded.
   With --field DIR the deployed IR is also measured on the labelled field samples it
   has not trained or validated on (field.py), per reason, at the bundle's threshold.
8. packaging.py: golden probes (probes.py: noise and synthetic smears, no patient
   data), the drift reference (the deployed IR's figures on the validation split:
   shared/drift.py), the model card, the manifest and its signature; `load_bundle`
   verifies the bundle as a node would before it is renamed into place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import TypeAdapter, ValidationError

from cellwatch.shared.bundle import Bundle, load_bundle
from cellwatch.shared.manifest import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Decision,
)
from cellwatch.shared.provenance import QualityFloor
from cellwatch.shared.schemas import ModelName, Version
from cellwatch.shared.signing import TrustedKeys, key_id, load_private_key
from cellwatch.training import LABELS, ir, probes
from cellwatch.training.base import BaseCheck, check_base
from cellwatch.training.calibrated import calibrate_run, freeze
from cellwatch.training.calibration import (
    DEFAULT_BAND_HALF_WIDTH,
    DEFAULT_TARGET_SENSITIVITY,
    check,
)
from cellwatch.training.dataset import ImageEntry
from cellwatch.training.errors import ExportError, GateError, QualityError
from cellwatch.training.field import load_field, measure_deployed, unseen_samples
from cellwatch.training.gate import (
    DEFAULT_MAX_PROB_DIFF,
    DEFAULT_MAX_SENSITIVITY_DROP,
    DEFAULT_MIN_AGREEMENT,
    Gate,
)
from cellwatch.training.measure import (
    Candidate,
    Inputs,
    Limits,
    agreement_metric,
    candidate,
    figures,
    gate_of,
    load_inputs,
    meets_on_validation,
)
from cellwatch.training.measure import quantization as measured_quantization
from cellwatch.training.modelcard import CardFacts, render
from cellwatch.training.outdir import check_target, staged_dir
from cellwatch.training.packaging import (
    drift_reference,
    golden_probes,
    provenance_of,
    sign,
)
from cellwatch.training.quality import assess
from cellwatch.training.runinfo import (
    RunInfo,
    load_run,
    load_run_split,
    record_test_read,
)
from cellwatch.training.split import SplitFile
from cellwatch.training.stratify import SplitName

log = logging.getLogger(__name__)

FP32_MAX_DIFF = 1e-4
"""fp32 IR vs frozen.pb (f32 inference): larger means the conversion is wrong."""
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
    max_sensitivity_drop: float = DEFAULT_MAX_SENSITIVITY_DROP
    max_prob_diff: float = DEFAULT_MAX_PROB_DIFF
    allow_degraded: bool = False
    allow_untrained: bool = False
    allow_no_test: bool = False
    allow_no_skill: bool = False
    base_is: str | None = None
    """What the base checkpoint is, in the user's words, when its hash is not the
    published file's (--base-is); recorded, and the bundle is flagged unverified-base."""
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    band_half_width: float = DEFAULT_BAND_HALF_WIDTH
    threshold: float | None = None
    """A fixed decision threshold instead of one chosen on validation."""
    prevalence: float | None = None
    """A prevalence of ALL at which the model card also gives PPV and NPV (--prevalence)."""
    field: tuple[Path, ...] = ()
    """Labelled field directories (shared/samples.py) the deployed model is also measured on;
    the figures go into the manifest (`metrics.field`) and the model card."""
    int8_method: Int8Method = "auto"
    """auto: accuracy control only when plain quantisation misses the gate on the
    validation split; ptq: plain post-training quantisation only; accuracy-control:
    always (plain quantisation is still measured, for the record)."""

    @property
    def limits(self) -> Limits:
        return Limits(self.min_agreement, self.max_sensitivity_drop, self.max_prob_diff)


@dataclass(frozen=True)
class Plan:
    """What export works on, after the cheap checks (stage 1)."""

    run: Path
    info: RunInfo
    split: SplitFile
    eval_split: SplitName
    base: BaseCheck
    trusted: TrustedKeys
    key: Any

    @property
    def entries(self) -> list[ImageEntry]:
        return self.split.entries(self.eval_split)

    @property
    def y_eval(self) -> np.ndarray:
        return np.array([e.label for e in self.entries], np.int64)

    @property
    def unit_groups(self) -> list[str] | None:
        """The eval images' patients/smears when a groups file gave them, else None."""
        return [e.group for e in self.entries] if self.split.grouping == "groups-file" else None


def export(run: Path, out: Path, options: ExportOptions) -> Bundle:
    """Export run as a signed bundle in out; returns the bundle as load_bundle verified it."""
    plan = _plan(run, out, options)
    unseen = (
        unseen_samples(
            load_field(options.field), plan.split.entries("train") + plan.split.entries("val")
        )
        if options.field
        else None
    )
    calibration, decision, val_probs = calibrate_run(
        run,
        plan.info,
        plan.split,
        target_sensitivity=options.target_sensitivity,
        band_half_width=options.band_half_width,
        threshold=options.threshold,
    )
    frozen = freeze(run, plan.info, calibration)
    inputs = load_inputs(
        plan.split,
        plan.eval_split,
        frozen,
        options.calibration_size,
        plan.info.config.seed,
        int8=options.precision == "int8",
    )
    plan = replace(plan, info=record_test_read(run, "export", plan.eval_split, len(plan.entries)))
    quality = _quality(plan, inputs.eval_reference[:, 1], options)
    p_eval = inputs.eval_reference[:, 1]
    checked = check(p_eval, calibration.temperature, calibration.applied, plan.y_eval, decision)
    calibration = calibration.model_copy(update={"test": checked})
    with staged_dir(out, marker=MANIFEST_FILE, force=options.force, what="bundle") as tmp:
        tried = _convert(frozen, inputs, val_probs, decision, options, tmp / "model.xml")
        chosen = tried[-1]
        gate = _gate(_verdict(plan, inputs, chosen, decision, options), options)
        _check_fp32(chosen, inputs, options)
        metrics = figures(
            chosen,
            inputs,
            plan.y_eval,
            decision.threshold,
            split=plan.eval_split,
            fingerprint=plan.split.fingerprints[plan.eval_split],
            precision=options.precision,
            groups=plan.unit_groups,
        )
        if unseen is not None:
            field = measure_deployed(
                tmp / "model.xml",
                unseen,
                decision.threshold,
                options.precision,
                plan.info.synthetic,
            )
            metrics = metrics.model_copy(update={"field": field})
        spec = golden_probes(tmp, decision, options.precision)
        reference = drift_reference(plan, inputs, chosen, decision)
        quantization = measured_quantization(
            tried,
            inputs,
            plan.y_eval,
            decision.threshold,
            options.limits,
            options.int8_method if options.precision == "int8" else None,
        )
        provenance = provenance_of(plan, frozen, len(inputs.calibration_set), options)
        provenance = provenance.model_copy(
            update={"gate": gate, "quality": quality, "quantization": quantization}
        )
        card = CardFacts(
            name=options.name,
            version=options.version,
            labels=list(LABELS),
            metrics=metrics,
            calibration=calibration,
            decision=decision,
            gate=gate,
            quality=quality,
            provenance=provenance,
            split=plan.split,
            golden=probes.DESCRIPTION,
            prevalence=options.prevalence,
        )
        (tmp / MODEL_CARD_FILE).write_text(render(card))
        sign(tmp, plan, options, metrics, provenance, calibration, decision, spec, reference)
    log.info(
        "bundle %s %s (%s) written to %s%s",
        options.name,
        options.version,
        options.precision,
        out,
        " from SYNTHETIC data" if plan.info.synthetic else "",
    )
    return load_bundle(out, plan.trusted)


def _plan(run: Path, out: Path, options: ExportOptions) -> Plan:
    """Stage 1: options, run and split, base, output, key (no TensorFlow yet)."""
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
    base = check_base(info, options.base_is)
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
    return Plan(run, info, split, eval_split, base, trusted, key)


def _quality(plan: Plan, p_eval: np.ndarray, options: ExportOptions) -> QualityFloor:
    """Stage 5: the quality floor on the eval split (TensorFlow's probabilities)."""
    train = plan.split.entries("train")
    prior = float(np.mean([e.label for e in train])) if train else 0.5
    floor = assess(plan.y_eval, p_eval, prior, split=plan.eval_split, groups=plan.unit_groups)
    if floor.passed:
        return floor
    reasons = "; ".join(floor.reasons)
    if not options.allow_no_skill:
        raise QualityError(
            f"no evidence of skill on {floor.n} {plan.eval_split} images: {reasons}; nothing "
            "was written (train longer or on more data, or --allow-no-skill to ship it "
            "labelled no-skill)"
        )
    log.warning("exporting a model with NO evidence of skill (--allow-no-skill): %s", reasons)
    return floor.model_copy(update={"overridden": True})


def _convert(
    frozen: Path,
    inputs: Inputs,
    val_probs: np.ndarray,
    decision: Decision,
    options: ExportOptions,
    xml: Path,
) -> list[Candidate]:
    """Stage 6: the IR at the asked precision, run on every image; the last candidate is
    the one saved at xml. int8's method is chosen on the validation split, never test."""
    started = time.perf_counter()
    model = ir.convert(frozen)
    if options.precision != "int8":
        return [candidate("conversion", model, xml, inputs, options.precision, started)]
    model = ir.quantize(model, inputs.calibration_set)
    ptq = candidate(
        "post-training quantisation (NNCF)", model, xml, inputs, options.precision, started
    )
    meets = meets_on_validation(ptq, inputs, decision.threshold, options.limits)
    wants_control = options.int8_method == "accuracy-control" or (
        options.int8_method == "auto" and not meets
    )
    if not wants_control:
        return [ptq]
    if inputs.val is None:
        log.warning("no validation split: accuracy-aware quantisation is not possible")
        return [ptq]
    started = time.perf_counter()
    controlled = ir.quantize_with_accuracy_control(
        ir.convert(frozen),
        inputs.calibration_set,
        [x[np.newaxis] for x in inputs.every[inputs.val]],
        agreement_metric(val_probs[:, 1], decision.threshold),
        max_drop=1.0 - options.min_agreement,
    )
    method = "accuracy-aware quantisation (NNCF)"
    return [ptq, candidate(method, controlled, xml, inputs, options.precision, started)]


def _verdict(
    plan: Plan, inputs: Inputs, c: Candidate, decision: Decision, options: ExportOptions
) -> Gate:
    gate = gate_of(c, inputs, plan.y_eval, decision.threshold, options.limits)
    log.info(
        "%s %s IR (%s): agreement with TensorFlow %.3f on %d images, sensitivity drop %s, "
        "max |p difference| %.3g: gate %s (%.1f s)",
        options.precision,
        c.method,
        c.inference_precision,
        gate.agreement or 0.0,
        gate.agreement_n or 0,
        "n/a" if gate.sensitivity_drop is None else f"{gate.sensitivity_drop:.3f}",
        gate.max_prob_diff or 0.0,
        "passed" if gate.passed else "FAILED: " + "; ".join(gate.failures()),
        c.seconds,
    )
    return gate


def _gate(gate: Gate, options: ExportOptions) -> Gate:
    """Stage 7: GateError for a failed fidelity gate, unless --allow-degraded."""
    if gate.passed:
        return gate
    figures_text = "; ".join(gate.failures())
    if not options.allow_degraded:
        raise GateError(
            f"the {options.precision} model fails the export gate on {gate.agreement_n} "
            f"images: {figures_text}; nothing was written (try another --precision, or "
            "--allow-degraded to ship it labelled degraded)"
        )
    log.warning("exporting a DEGRADED model (--allow-degraded): %s", figures_text)
    return gate.model_copy(update={"overridden": True})


def _check_fp32(c: Candidate, inputs: Inputs, options: ExportOptions) -> None:
    if options.precision != "fp32":
        return
    worst = float(np.abs(c.f32 - inputs.reference).max())
    if worst > FP32_MAX_DIFF:
        raise ExportError(
            f"fp32 IR differs from frozen.pb by {worst:.3g} (> {FP32_MAX_DIFF:g}): "
            "the conversion is wrong"
        )


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
        ("--max-sensitivity-drop", options.max_sensitivity_drop),
        ("--max-prob-diff", options.max_prob_diff),
        ("--prevalence", 0.5 if options.prevalence is None else options.prevalence),
        ("--target-sensitivity", options.target_sensitivity),
        ("--threshold", 0.5 if options.threshold is None else options.threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise ExportError(f"{flag} must be between 0 and 1, not {value:g}")
    if not 0.0 <= options.band_half_width < 0.5:
        raise ExportError(f"--band-half-width must be in [0, 0.5), not {options.band_half_width:g}")
