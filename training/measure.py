"""Export's measuring stages: the images it measures on, the converted candidates, the
fidelity gate and the figures that go into the manifest (`metrics`).

Every image of the split is preprocessed once (the eval split first, then validation,
then training) and run through frozen.pb in TensorFlow (`Inputs.reference`). Each
converted IR (`Candidate`) runs on all of them at the device's default inference
precision ("deployed") and forced to f32. Agreement with TensorFlow's decisions and
the largest |p difference| are measured on every image (they need no labels); the
labelled figures on the eval split (test).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.shared.figures import UnitFigures
from cellwatch.shared.provenance import Attempt, Quantization
from cellwatch.training import IMAGE_SIZE, ir
from cellwatch.training.bundle_metrics import (
    BundleMetrics,
    Deployed,
    Parity,
    Reference,
    machine_name,
)
from cellwatch.training.dataset import ImageEntry
from cellwatch.training.evalgraph import FrozenGraph
from cellwatch.training.evaluate import batches
from cellwatch.training.gate import Gate, judge
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.split import SplitFile
from cellwatch.training.stats import MetricSet, Proportion, agreement, fmt, metric_set, unit_figures
from cellwatch.training.stratify import SplitName

log = logging.getLogger(__name__)

MAX_AGREEMENT_TRAIN_IMAGES = 1000
"""Training images measured for the agreement at most (a seeded sample beyond it)."""


@dataclass(frozen=True)
class Inputs:
    """Preprocessed images and TensorFlow's probabilities of them (rows: eval split,
    then validation unless it is the eval split, then training images)."""

    every: np.ndarray
    reference: np.ndarray
    n_eval: int
    val: slice | None
    calibration_set: list[np.ndarray]

    @property
    def eval(self) -> np.ndarray:
        return self.every[: self.n_eval]

    @property
    def eval_reference(self) -> np.ndarray:
        return self.reference[: self.n_eval]


@dataclass(frozen=True)
class Candidate:
    """One converted model, run on every image of Inputs."""

    method: str
    deployed: np.ndarray
    f32: np.ndarray
    inference_precision: str
    seconds: float


@dataclass(frozen=True)
class Limits:
    min_agreement: float
    max_sensitivity_drop: float
    max_prob_diff: float


def load_inputs(
    split: SplitFile,
    eval_split: SplitName,
    frozen: Path,
    calibration_size: int,
    seed: int,
    int8: bool,
) -> Inputs:
    """Preprocess the images and run frozen.pb on them."""
    train = split.entries("train")
    if len(train) > MAX_AGREEMENT_TRAIN_IMAGES:
        keep = np.random.default_rng([seed, 0xA9]).permutation(len(train))
        train = [train[i] for i in sorted(keep[:MAX_AGREEMENT_TRAIN_IMAGES])]
    val = split.entries("val") if eval_split != "val" else []
    with Preprocessor() as pre:
        x_eval = _stack(split, split.entries(eval_split), pre, f"{eval_split} inputs")
        x_val = _stack(split, val, pre, "validation inputs")
        x_train = _stack(split, train, pre, "training inputs")
        calibration_set = _calibration_set(split, pre, calibration_size, seed) if int8 else []
    every = np.concatenate([x_eval, x_val, x_train])
    with FrozenGraph(frozen) as graph:
        reference = graph.predict(every)
    n_eval = len(x_eval)
    if eval_split == "val":
        val_rows: slice | None = slice(0, n_eval)
    else:
        val_rows = slice(n_eval, n_eval + len(x_val)) if len(x_val) else None
    return Inputs(every, reference, n_eval, val_rows, calibration_set)


def _stack(
    split: SplitFile, entries: Sequence[ImageEntry], pre: Preprocessor, what: str
) -> np.ndarray:
    if not entries:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    return np.concatenate(list(batches(split.root, entries, pre, what)))


def _calibration_set(split: SplitFile, pre: Preprocessor, size: int, seed: int) -> list[np.ndarray]:
    train = split.entries("train")
    order = np.random.default_rng([seed, 0xCA1]).permutation(len(train))[:size]
    chosen = [train[i] for i in sorted(order)]
    return [x[np.newaxis] for b in batches(split.root, chosen, pre, "calibration") for x in b]


def candidate(
    method: str, model: Any, xml: Path, inputs: Inputs, precision: ir.Precision, started: float
) -> Candidate:
    """Save model as the bundle's IR at xml and run it on every image."""
    ir.save(model, xml, precision)
    deployed_ir = ir.CompiledIR(xml, ir.DEVICE_DEFAULT)
    return Candidate(
        method=method,
        deployed=deployed_ir.predict(inputs.every),
        f32=ir.CompiledIR(xml).predict(inputs.every),
        inference_precision=deployed_ir.inference_precision,
        seconds=time.perf_counter() - started,
    )


def meets_on_validation(c: Candidate, inputs: Inputs, threshold: float, limits: Limits) -> bool:
    """Whether a candidate meets the gate's agreement and |p difference| on the validation
    split (how int8's method is chosen: never on test). True without validation images."""
    if inputs.val is None:
        return True
    ref, dep = inputs.reference[inputs.val], c.deployed[inputs.val]
    agree = agreement(dep[:, 1] >= threshold, ref[:, 1] >= threshold)
    worst = float(np.abs(dep - ref).max())
    ok = (agree.value or 0.0) >= limits.min_agreement and worst <= limits.max_prob_diff
    log.info(
        "%s on %d validation images: agreement %s, max |p difference| %.3g: %s",
        c.method,
        len(ref),
        fmt(agree),
        worst,
        "meets the gate" if ok else "misses the gate",
    )
    return ok


def agreement_metric(reference: np.ndarray, threshold: float) -> Callable[[np.ndarray], float]:
    """NNCF's validation metric: the share of validation decisions equal to TensorFlow's
    (reference: TensorFlow's p(ALL) on the validation split)."""

    def metric(probs: np.ndarray) -> float:
        return float(np.mean((probs[:, 1] >= threshold) == (reference >= threshold)))

    return metric


def agreement_all(c: Candidate, inputs: Inputs, threshold: float) -> Proportion:
    return agreement(c.deployed[:, 1] >= threshold, inputs.reference[:, 1] >= threshold)


def gate_of(
    c: Candidate, inputs: Inputs, y_eval: np.ndarray, threshold: float, limits: Limits
) -> Gate:
    """The fidelity gate's verdict for a candidate (not yet overridden)."""
    n = inputs.n_eval
    return judge(
        agreement_all(c, inputs, threshold),
        metric_set(y_eval, inputs.reference[:n, 1], threshold),
        metric_set(y_eval, c.deployed[:n, 1], threshold),
        float(np.abs(c.deployed - inputs.reference).max()),
        min_agreement=limits.min_agreement,
        max_sensitivity_drop=limits.max_sensitivity_drop,
        max_prob_diff_limit=limits.max_prob_diff,
    )


def figures(
    c: Candidate,
    inputs: Inputs,
    y_eval: np.ndarray,
    threshold: float,
    *,
    split: SplitName,
    fingerprint: str,
    precision: ir.Precision,
    groups: Sequence[str] | None,
) -> BundleMetrics:
    """manifest.metrics: the deployed model's figures, f32's and TensorFlow's beside them."""
    n = inputs.n_eval
    ref, dep, f32 = inputs.reference[:n], c.deployed[:n], c.f32[:n]

    def on(p: np.ndarray) -> MetricSet:
        return metric_set(y_eval, p[:, 1], threshold, groups=groups)

    units = None
    if groups is not None:
        count, unit_set = unit_figures(y_eval, dep[:, 1], groups, threshold)
        units = UnitFigures(units=count, metrics=unit_set)
    return BundleMetrics(
        split=split,
        n=n,
        split_fingerprint=fingerprint,
        deployed=Deployed(
            precision=precision,
            device=ir.CompiledIR.device,
            inference_precision=c.inference_precision,
            machine=machine_name(),
            metrics=on(dep),
        ),
        f32=Reference(metrics=on(f32)),
        tensorflow=Reference(metrics=on(ref)),
        agreement=agreement(dep[:, 1] >= threshold, ref[:, 1] >= threshold),
        agreement_all=agreement_all(c, inputs, threshold),
        parity=Parity(
            max_abs_diff_f32=float(np.abs(c.f32 - inputs.reference).max()),
            max_abs_diff_deployed=float(np.abs(c.deployed - inputs.reference).max()),
        ),
        units=units,
    )


def quantization(
    tried: list[Candidate],
    inputs: Inputs,
    y_eval: np.ndarray,
    threshold: float,
    limits: Limits,
    int8_method: str | None,
) -> Quantization:
    """provenance.quantization: every int8 candidate tried, with its gate figures (None
    int8_method: not quantised)."""
    if int8_method is None:
        return Quantization(method=None)
    attempts = []
    for c in tried:
        g = gate_of(c, inputs, y_eval, threshold, limits)
        attempts.append(
            Attempt(
                method=c.method,
                split="all",
                agreement=g.agreement,
                agreement_k=round((g.agreement or 0.0) * (g.agreement_n or 0)),
                n=g.agreement_n,
                sensitivity_drop=g.sensitivity_drop,
                max_prob_diff=g.max_prob_diff,
                deployed=metric_set(y_eval, c.deployed[: inputs.n_eval, 1], threshold),
                passed=g.passed,
                seconds=round(c.seconds, 1),
            )
        )
    return Quantization(method=tried[-1].method, int8_method=int8_method, attempts=attempts)
