"""MODEL_CARD.md: what a bundle is, what it was trained and measured on, and what it is not.

Written by `export` into every bundle and listed (hashed) in its manifest, so the
card travels with the model and cannot be swapped. Every figure is the deployed
model's own, with its interval and counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from cellwatch.shared.figures import BundleMetrics, FieldEvaluation, MetricSet
from cellwatch.shared.manifest import Calibration, Decision
from cellwatch.shared.provenance import Gate, Provenance, QualityFloor
from cellwatch.shared.samples import UNBIASED_REASON, SampleReason
from cellwatch.training.split import SplitFile
from cellwatch.training.stats import fmt
from cellwatch.training.stratify import SPLIT_NAMES

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
    quality: QualityFloor
    provenance: Provenance
    split: SplitFile
    golden: str
    prevalence: float | None = None
    """A user-given prevalence of ALL for PPV and NPV (--prevalence)."""


INTENDED_USE = {
    "ALL-IDB2": "one microscope image of a stained peripheral blood smear cropped around "
    "a single white cell (ALL-IDB2 style, about 257 px per crop)",
    "ALL-IDB1": "one whole-field microscope image of a stained peripheral blood smear "
    "(ALL-IDB1 style: many cells, several possibly blasts); the answer is about the field "
    "as a whole, not about any one cell",
}
"""What one input is, per data layout the model was trained on."""


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
    if p.synthetic:
        warnings.append(
            "trained and tested on **SYNTHETIC** images: the figures measure the pipeline, "
            "not performance on blood smears"
        )
    if p.base_checkpoint is None:
        warnings.append(
            "**UNTRAINED base**: Inception V3 started from random weights (no ImageNet "
            "checkpoint), exported with --allow-untrained"
        )
    if p.base_verified is False:
        warnings.append(
            "**UNVERIFIED base**: the base checkpoint's SHA-256 is not the published TF-Slim "
            f"file's; the exporter says it is: {p.base_claim!r} (--base-is)"
        )
    if f.quality.overridden:
        warnings.append(
            "**NO evidence of skill** on the test split ("
            + "; ".join(f.quality.reasons)
            + "), exported with --allow-no-skill"
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
    use = INTENDED_USE.get(
        s.layout,
        "one microscope image of a stained peripheral blood smear, framed as the training "
        f"images were ({s.layout} layout)",
    )
    lines += [
        "## Intended use",
        "",
        f"Input: {use}. Output: `{f.labels[0]}` or `{f.labels[1]}` (acute lymphoblastic "
        "leukaemia blast) with p(ALL), on edge devices (cellwatch nodes).",
        "",
        "- Intended users: researchers and laboratory engineers evaluating image "
        "classification of blood smears; not clinicians making decisions about patients.",
        "- Setting: research laboratories, on images from the same kind of microscope, "
        "stain and magnification as the training data, after local validation.",
        "- Not for diagnosis, screening, triage or any clinical decision.",
        "- Contraindications (do not use): images of other specimens (bone marrow, tissue), "
        "other stains or magnifications, other cell types or leukaemias, paediatric or adult "
        "populations unlike the training data's, images of poor focus or exposure, and "
        f"framings other than the one above{_framing(s.layout)}.",
        "",
        "## Model",
        "",
        f"- TF-Slim Inception V3 (depth multiplier {p.depth_multiplier or 1.0:g}), 2-class "
        f"head; mode {p.mode}, trained scopes {', '.join(p.trainable_scopes or [])}",
        f"- base checkpoint: {p.base_checkpoint or 'none (random initialisation)'}"
        + (f" (SHA-256 {p.base_checkpoint_sha256})" if p.base_checkpoint_sha256 else "")
        + (
            f"; verified: the published {p.base_published}"
            if p.base_verified
            else "; NOT verified: not the published file's hash"
            if p.base_verified is False
            else ""
        ),
        f"- kept epoch {p.selected_epoch} of {p.epochs}: {p.selection}",
        f"- precision {dep.precision}; "
        + (
            f"int8 by {p.quantization.method}"
            if p.quantization is not None and p.quantization.method
            else "no quantisation"
        ),
        "",
        "## Data",
        "",
        f"- layout {s.layout}{', SYNTHETIC' if s.synthetic else ''}; data fingerprint "
        f"`{s.fingerprints['all']}`",
        f"- grouping: {_grouping(s)}",
        f"- near-duplicates merged into one group before the split: {len(s.merged)} pairs "
        f"(looked for by {s.leakage_check}); pairs across splits: {len(s.near_duplicates)}",
        f"- split seed {s.seed}, fractions val {s.val_fraction:g} / test {s.test_fraction:g}"
        + (f", {s.folds} cross-validation folds" if s.folds else ""),
        *_field_data(s),
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
        f"The test split was read {p.test_reads if p.test_reads is not None else '?'} "
        "time(s) by this run "
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
        f"Fidelity gate: agreement with TensorFlow >= {f.gate.min_agreement:g} on every image"
        + (f" ({fmt(m.agreement_all, 3)})" if m.agreement_all is not None else "")
        + f", sensitivity drop <= {f.gate.max_sensitivity_drop:g}, max |p difference| <= "
        f"{f.gate.max_prob_diff_limit:g}: {'passed' if f.gate.passed else 'FAILED'}"
        + (" (overridden)" if f.gate.overridden else "")
        + ".",
        f"Quality floor (evidence of skill): ROC AUC lower 95% bound "
        f"{_num(f.quality.auc_ci_low)} > 0.5, Brier {_num(f.quality.brier)} better than the "
        f"prior's {_num(f.quality.prior_brier)}: {'passed' if f.quality.passed else 'FAILED'}"
        + (" (overridden)" if f.quality.overridden else "")
        + ".",
        "",
        *_units(m),
        *_prevalence(dep.metrics, f.prevalence),
        *_field(m.field),
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
    if c.rule:
        lines.append(f"Rule: {c.rule}.")
    if c.test is not None:
        t = c.test
        lines += [
            "",
            f"On the {t.split} split (n = {t.n}), shipped vs uncalibrated: ECE {t.ece:.3f} vs "
            f"{t.ece_uncalibrated:.3f}, NLL {t.nll:.3f} vs {t.nll_uncalibrated:.3f}, Brier "
            f"{t.brier:.3f} vs {t.brier_uncalibrated:.3f}; {t.errors_in_band} of {t.errors} "
            f"errors fall inside the low-confidence band; {t.errors_more_confident} errors "
            "are more confident than uncalibrated.",
        ]
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
        f"- Expects {use}, at roughly the training data's magnification; other framings, "
        "cell types and artefacts are out of scope and get a confident-looking answer anyway.",
        "- Two classes only: other leukaemias, reactive lymphocytes and blasts of other "
        "lineages are not modelled.",
        f"- Grouping: {_grouping(s)}.",
        _external(m.field),
        "- No subgroup results (by patient age, sex, leukaemia subtype, stain batch or "
        "microscope): the data carry no such labels, so performance may differ between "
        "subgroups unseen.",
        "",
        "## Golden self-test",
        "",
        f"{f.golden}. A node runs them before it serves the bundle.",
        "",
        "## Software",
        "",
    ]
    versions = p.export_versions or {}
    lines += [f"- {name} {version}" for name, version in sorted(versions.items())]
    lines += [
        "",
        f"Code: git commit `{p.code_commit or 'unknown'}`. Data fingerprint "
        f"`{s.fingerprints['all']}`; frozen.pb SHA-256 `{p.frozen_pb_sha256 or ''}`.",
        "",
    ]
    return "\n".join(lines)


def _field_data(s: SplitFile) -> list[str]:
    if not s.field:
        return []
    n = sum(f.samples for f in s.field)
    sources = len({x for f in s.field for x in f.sources})
    return [
        f"- labelled field samples among the images: {n} from {sources} sources (`prepare "
        "--field`; one group per source, near-copies merged with the data set's)"
    ]


def _field(ev: FieldEvaluation | None) -> list[str]:
    """The field evaluation (export --field), per reason with counts and dates."""
    if ev is None:
        return []
    lines = [
        f"## Field evaluation (labelled field samples, n = {ev.all.n})",
        "",
        f"The {ev.model} on labelled samples the fleet sent back, at the threshold above "
        f"({ev.threshold:.3f}); 95% intervals and counts. **{ev.note[0].upper()}{ev.note[1:]}.**"
        + (
            f" {ev.excluded} samples were left out: (near-)copies of training or validation images."
            if ev.excluded
            else ""
        ),
        "",
        "| samples | n | sources | collected | accuracy | sensitivity | specificity | ROC AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(SampleReason, key=lambda r: r != UNBIASED_REASON)
    for name, fig in [*((r.value, ev.per_reason[r]) for r in ordered), ("all", ev.all)]:
        when = f"{fig.first:%Y-%m-%d} to {fig.last:%Y-%m-%d}" if fig.first and fig.last else "-"
        if fig.metrics is None:
            lines.append(f"| {name} | 0 | 0 | - | no samples | | | |")
            continue
        cells = " | ".join(
            _figure(fig.metrics, k) for k in ("accuracy", "sensitivity", "specificity", "roc_auc")
        )
        lines.append(f"| {name} | {fig.n} | {fig.sources} | {when} | {cells} |")
    return [*lines, ""]


def _external(ev: FieldEvaluation | None) -> str:
    if ev is None:
        return (
            "- No external validation: every figure is on held-out images of the same data "
            "source; no field evaluation on another site's images exists yet."
        )
    unbiased = ev.per_reason[UNBIASED_REASON].n
    return (
        f"- External validation is limited to {ev.all.n} labelled field samples "
        f"({unbiased} `random`, the only unbiased ones) from {ev.all.sources} sources: read "
        "the field figures with their intervals."
    )


def _framing(layout: str) -> str:
    if layout == "ALL-IDB2":
        return " (whole-field images for this single-cell model)"
    if layout == "ALL-IDB1":
        return " (single-cell crops for this whole-field model)"
    return ""


def _units(m: BundleMetrics) -> list[str]:
    if m.units is None:
        return [
            "Figures are per image; no patient/smear-level figures (no --groups file).",
            "",
        ]
    u = m.units.metrics
    return [
        f"Per patient/smear ({m.units.units} units; a unit is ALL if any image is, scored "
        f"by its highest p(ALL)): sensitivity {fmt(u.sensitivity)}, specificity "
        f"{fmt(u.specificity)}, ROC AUC {fmt(u.roc_auc)}. Image-level intervals above "
        "resample whole patients/smears.",
        "",
    ]


def predictive_values(
    sensitivity: float, specificity: float, prevalence: float
) -> tuple[float | None, float | None]:
    """PPV and NPV at a prevalence of ALL (Bayes' rule); None where undefined."""
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    ppv = tp / (tp + fp) if tp + fp > 0 else None
    npv = tn / (tn + fn) if tn + fn > 0 else None
    return ppv, npv


def _prevalence(d: MetricSet, prevalence: float | None) -> list[str]:
    sens, spec = d.sensitivity.value, d.specificity.value
    positives = d.confusion[1][0] + d.confusion[1][1]
    here = positives / d.n if d.n else None
    lines = [
        "PPV and NPV depend on how common ALL is among the images a node sees: the figures "
        "above hold at the test split's prevalence"
        + (f" ({here:.0%})" if here is not None else "")
        + ", which the split's construction set, not any clinical population.",
    ]
    if sens is None or spec is None:
        return [*lines, ""]
    for label, pi in (("the test split's", here), ("the given (--prevalence)", prevalence)):
        if pi is None:
            continue
        ppv, npv = predictive_values(sens, spec, pi)
        lines.append(
            f"- at {label} prevalence {pi:.1%}: PPV {_num(ppv)}, NPV {_num(npv)} (from the "
            "deployed sensitivity and specificity)"
        )
    if prevalence is None:
        lines.append(
            "- at 1% prevalence: PPV "
            f"{_num(predictive_values(sens, spec, 0.01)[0])}, NPV "
            f"{_num(predictive_values(sens, spec, 0.01)[1])} (illustration; give yours with "
            "--prevalence)"
        )
    return [*lines, ""]


def _grouping(s: SplitFile) -> str:
    if s.grouping == "groups-file":
        return f"by patient/smear from a groups file (SHA-256 {s.groups_file_sha256})"
    return (
        "each file its own group: images of one patient or smear may sit in both training "
        "and test (no --groups file was given)"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
