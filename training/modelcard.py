"""MODEL_CARD.md: what a bundle is, what it was trained and measured on, and what it is not.

Written by `export` into every bundle and listed (hashed) in its manifest, so the
card travels with the model and cannot be swapped. Every figure is the deployed
model's own, with its interval and counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cellwatch.shared.manifest import Calibration, Decision
from cellwatch.training.bundle_metrics import BundleMetrics
from cellwatch.training.gate import Gate
from cellwatch.training.split import SPLIT_NAMES, SplitFile
from cellwatch.training.stats import MetricSet, fmt

ROWS = (
    ("accuracy", "accuracy"),
    ("sensitivity", "sensitivity (ALL found)"),
    ("specificity", "specificity (normal kept)"),
    ("precision", "precision (PPV)"),
    ("npv", "negative predictive value"),
    ("roc_auc", "ROC AUC"),
)


@dataclass(frozen=True)
class CardFacts:
    name: str
    version: str
    labels: list[str]
    metrics: BundleMetrics
    calibration: Calibration
    decision: Decision
    gate: Gate
    provenance: Mapping[str, Any]
    split: SplitFile
    golden: str


def _figure(m: MetricSet, key: str) -> str:
    value = getattr(m, key)
    return str(fmt(value))


def render(f: CardFacts) -> str:
    m, p, s = f.metrics, f.provenance, f.split
    dep = m.deployed
    lines: list[str] = [
        f"# Model card: {f.name} {f.version}",
        "",
        "> **Research use only. Not a medical device and not for diagnosis.** Its outputs must "
        "not be used for clinical decisions.",
        "",
    ]
    warnings = []
    if p.get("synthetic"):
        warnings.append(
            "trained and tested on **SYNTHETIC** images: the figures measure the pipeline, "
            "not performance on blood smears"
        )
    if p.get("base_checkpoint") is None:
        warnings.append(
            "**UNTRAINED base**: Inception V3 started from random weights (no ImageNet "
            "checkpoint), exported with --allow-untrained"
        )
    if f.gate.overridden:
        warnings.append(
            "**DEGRADED**: the deployed precision failed the export gate ("
            + "; ".join(f.gate.failures())
            + ") and was exported with --allow-degraded"
        )
    if m.split != "test":
        warnings.append(
            "**no test split**: the figures below are on the validation split, which also "
            "chose the calibration and threshold (--allow-no-test): they are optimistic"
        )
    if warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in warnings), ""]
    lines += [
        "## Intended use",
        "",
        f"Classifies one microscope image of a stained peripheral blood smear, centred on a "
        f"white cell, as `{f.labels[0]}` or `{f.labels[1]}` (acute lymphoblastic leukaemia "
        "blast), for research on edge devices (cellwatch nodes). Not for diagnosis, "
        "screening or any clinical decision.",
        "",
        "## Model",
        "",
        f"- TF-Slim Inception V3, 2-class head; mode {p.get('mode')}, trained scopes "
        f"{', '.join(p.get('trainable_scopes') or [])}",
        f"- base checkpoint: {p.get('base_checkpoint') or 'none (random initialisation)'}"
        + (f" (SHA-256 {p['base_checkpoint_sha256']})" if p.get("base_checkpoint_sha256") else ""),
        f"- kept epoch {p.get('selected_epoch')} of {p.get('epochs')}: {p.get('selection')}",
        f"- precision {dep.precision}; "
        + (
            f"int8 by {p['quantization']['method']}"
            if p.get("quantization", {}).get("method")
            else "no quantisation"
        ),
        "",
        "## Data",
        "",
        f"- layout {s.layout}{', SYNTHETIC' if s.synthetic else ''}; data fingerprint "
        f"`{s.fingerprints['all']}`",
        f"- grouping: {_grouping(s)}",
        f"- near-duplicate pairs across splits (perceptual hash): {len(s.near_duplicates)}",
        "",
        "| split | images | " + " | ".join(f.labels) + " | fingerprint |",
        "|---|---|" + "---|" * len(f.labels) + "---|",
    ]
    for name in SPLIT_NAMES:
        counts = s.class_counts(name)
        lines.append(
            f"| {name} | {sum(counts.values())} | "
            + " | ".join(str(counts[label]) for label in f.labels)
            + f" | `{s.fingerprints.get(name, '')[:16]}` |"
        )
    lines += [
        "",
        f"The test split was read {p.get('test_reads', '?')} time(s) by this run "
        "(every `evaluate` and `export`); each look that informs a choice makes its "
        "figures more optimistic.",
        "",
        f"## Performance ({m.split} split, n = {m.n}, ALL positive, threshold "
        f"{f.decision.threshold:.3f})",
        "",
        f"Deployed: the {dep.precision} IR run by OpenVINO on {dep.device} "
        f"({dep.machine}) at its default inference precision ({dep.inference_precision}), "
        "95% intervals (Wilson; bootstrap for ROC AUC) and counts:",
        "",
        "| figure | deployed | IR at f32 | TensorFlow |",
        "|---|---|---|---|",
    ]
    for key, label in ROWS:
        lines.append(
            f"| {label} | {_figure(dep.metrics, key)} | {_figure(m.f32.metrics, key)} | "
            f"{_figure(m.tensorflow.metrics, key)} |"
        )
    cm = dep.metrics.confusion
    lines += [
        "",
        f"Deployed confusion matrix (rows true, columns predicted; {f.labels[0]}, "
        f"{f.labels[1]}): {cm}.",
        f"Decisions identical to TensorFlow's: {fmt(m.agreement, 3)}; max |p difference| "
        f"{m.parity.max_abs_diff_deployed:.2g} (f32: {m.parity.max_abs_diff_f32:.2g}).",
        f"Export gate: agreement >= {f.gate.min_agreement:g} and sensitivity drop <= "
        f"{f.gate.max_drop:g}: {'passed' if f.gate.passed else 'FAILED'}"
        + (" (overridden)" if f.gate.overridden else "")
        + ".",
        "",
        "## Calibration and decision",
        "",
    ]
    c = f.calibration
    if c.applied:
        lines.append(
            f"Temperature scaling fit on the validation split (n = {c.n}): T = "
            f"{c.temperature:.3g}, folded into the logits. Validation ECE "
            f"{_num(c.ece_before)} -> {_num(c.ece_after)}, Brier {_num(c.brier)}."
        )
    else:
        lines.append(
            f"Not calibrated (validation n = {c.n}): the uncalibrated logits ship. "
            f"Validation ECE {_num(c.ece_before)}, Brier {_num(c.brier)}."
        )
    if c.note:
        lines.append(f"Note: {c.note}.")
    lo, hi = f.decision.low_confidence
    lines += [
        "",
        f"Label `{f.decision.positive_label}` when p({f.decision.positive_label}) >= "
        f"{f.decision.threshold:.3f} (chosen for {f.decision.target}); results with "
        f"p({f.decision.positive_label}) in [{lo:.3f}, {hi:.3f}] are flagged low-confidence.",
        "",
        "## Known limitations",
        "",
        f"- Test set of {m.n} images: read every figure with its interval.",
        "- Trained on one data source: other microscopes, magnifications, cameras, staining "
        "protocols (May-Grünwald-Giemsa vs. Wright) and smear preparations change the "
        "images and the figures; validate locally before any use.",
        "- Expects a crop centred on one white cell at roughly the training data's "
        "magnification (ALL-IDB2: about 257 px per cell crop); whole-field images, other "
        "cell types and artefacts are out of scope and get a confident-looking answer anyway.",
        "- Two classes only: other leukaemias, reactive lymphocytes and blasts of other "
        "lineages are not modelled.",
        f"- Grouping: {_grouping(s)}.",
        "",
        "## Golden self-test",
        "",
        f"{f.golden}. A node runs them before it serves the bundle.",
        "",
        "## Software",
        "",
    ]
    versions: Mapping[str, str] = p.get("export_versions") or {}
    lines += [f"- {name} {version}" for name, version in sorted(versions.items())]
    lines += [
        "",
        f"Data fingerprint `{s.fingerprints['all']}`; frozen.pb SHA-256 "
        f"`{p.get('frozen_pb_sha256', '')}`.",
        "",
    ]
    return "\n".join(lines)


def _grouping(s: SplitFile) -> str:
    if s.grouping == "groups-file":
        return f"by patient/smear from a groups file (SHA-256 {s.groups_file_sha256})"
    return (
        "each file its own group: images of one patient or smear may sit in both training "
        "and test (no --groups file was given)"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
