"""`cellwatch-train`: synth, groups, prepare, fit, evaluate, export, keygen, sign.

Only argument parsing and printing; the work is in the library modules, imported
inside each command so `--help` does not load TensorFlow. Every CellwatchError
(a user's mistake or a failed check) becomes one line on stderr and exit code 2;
a model that fails the export gate exits with code 3.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import click

from cellwatch.shared.cli import friendly_errors, setup_logging
from cellwatch.training.progress import NOISY_LOGGERS, log_handler

if TYPE_CHECKING:
    from cellwatch.shared.figures import FieldEvaluation

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger("cellwatch.training")

_PATH = click.Path(path_type=Path)
_FRACTION = click.FloatRange(0, 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """Train the cellwatch ALL classifier (TF-Slim Inception V3) and export signed bundles.

    Research use only; not for diagnosis.
    """
    setup_logging("DEBUG" if verbose else "INFO", handler=log_handler(), quiet=NOISY_LOGGERS)


@main.command()
@click.argument("out", type=_PATH)
@click.option("--count", default=60, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--size",
    default=257,
    show_default=True,
    type=click.IntRange(64, 4096),
    help="image side in pixels (ALL-IDB2 crops are 257)",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["tif", "jpg"]),
    default="tif",
    show_default=True,
    help="tif (ALL-IDB2 style) or jpg (ALL-IDB1 style)",
)
@click.option(
    "--shift",
    type=click.Choice(["none", "stain", "blur"]),
    default="none",
    show_default=True,
    help="as another lab's images look: another stain batch, or out of focus (drift demos)",
)
@click.option("--force", is_flag=True, help="replace an existing synthetic folder")
@friendly_errors
def synth(
    out: Path, count: int, seed: int, size: int, image_format: str, shift: str, force: bool
) -> None:
    """Write a SYNTHETIC blood-smear data set (ALL-IDB names) into OUT, for demos and tests."""
    from cellwatch.training.synth import ImageFormat, Shift, write_dataset

    info = write_dataset(
        out,
        count,
        seed,
        size=size,
        force=force,
        image_format=cast(ImageFormat, image_format),
        shift=cast(Shift, shift),
    )
    shifted = "" if info.shift == "none" else f", shift {info.shift}"
    click.echo(
        f"wrote {info.count} SYNTHETIC images ({info.format}, seed {info.seed}{shifted}) to {out}"
    )


@main.command()
@click.argument("data", type=_PATH)
@click.option("--out", type=_PATH, required=True, help="split directory to write")
@click.option(
    "--val",
    default=None,
    type=click.FloatRange(0, 1, max_open=True),
    help="validation fraction [default: 0.15; 0 with --folds]",
)
@click.option("--test", default=0.15, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--groups",
    "groups_file",
    type=_PATH,
    default=None,
    help="CSV with columns path,group: the patient or smear of every image (one split each)",
)
@click.option(
    "--folds",
    default=0,
    show_default=True,
    type=click.IntRange(0, 20),
    help="K-fold cross-validation instead of a validation split (fit --fold i)",
)
@click.option(
    "--checkpoint",
    type=_PATH,
    default=None,
    help="base checkpoint: near-duplicates are also found by the cosine of its bottleneck "
    "features (cached for fit); without it, by perceptual hash only",
)
@click.option(
    "--depth-multiplier",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="the --checkpoint's Inception V3 width (as fit's)",
)
@click.option(
    "--allow-near-duplicates",
    is_flag=True,
    help="do not merge near-duplicates into one group; only warn about pairs across splits",
)
@click.option(
    "--strict",
    is_flag=True,
    help="with --allow-near-duplicates: refuse near-duplicate images in different splits",
)
@click.option(
    "--field",
    "field_dirs",
    type=_PATH,
    multiple=True,
    metavar="DIR",
    help="a labelled field directory (`cellwatch-hub samples export`, labels filled in); "
    "its samples join the data set, one group per source (repeatable)",
)
@click.option("--force", is_flag=True, help="replace an existing split directory")
@friendly_errors
def prepare(
    data: Path,
    out: Path,
    val: float | None,
    test: float,
    seed: int,
    groups_file: Path | None,
    folds: int,
    checkpoint: Path | None,
    depth_multiplier: float,
    allow_near_duplicates: bool,
    strict: bool,
    field_dirs: tuple[Path, ...],
    force: bool,
) -> None:
    """Check DATA's images (and --field samples), merge near-duplicates into one group, and
    split them by group (file, or --groups; a field source), stratified, into --out."""
    from cellwatch.training.split import LEAK_WARNING
    from cellwatch.training.split import prepare as run_prepare
    from cellwatch.training.stratify import SPLIT_NAMES

    split = run_prepare(
        data,
        out,
        val=(0.0 if folds else 0.15) if val is None else val,
        test=test,
        seed=seed,
        force=force,
        groups_file=groups_file,
        folds=folds,
        strict=strict,
        allow_near_duplicates=allow_near_duplicates,
        checkpoint=checkpoint,
        depth_multiplier=depth_multiplier,
        field=field_dirs,
    )
    tag = " SYNTHETIC" if split.synthetic else ""
    click.echo(f"{split.layout}{tag} data in {split.data_root}; split written to {out}")
    if split.grouping == "file" and not split.synthetic:
        click.echo(f"  warning: {LEAK_WARNING}")
    if split.merged:
        by = {kind: sum(m.by == kind for m in split.merged) for kind in ("phash", "features")}
        click.echo(
            f"  merged {len(split.merged)} near-duplicate pairs into one group each "
            f"({by['phash']} by perceptual hash, {by['features']} by bottleneck features; "
            "listed in split.json and above)"
        )
    click.echo(f"  near-duplicates looked for by: {split.leakage_check}")
    if split.near_duplicates:
        click.echo(
            f"  warning: {len(split.near_duplicates)} near-duplicate pairs in different splits "
            "(listed in split.json and above)"
        )
    if split.folds:
        click.echo(f"  {split.folds} cross-validation folds of the training images (fit --fold i)")
    for name in SPLIT_NAMES:
        counts = split.class_counts(name)
        total = sum(counts.values())
        shares = ", ".join(
            f"{label} {n} ({n / total:.0%})" if total else f"{label} 0"
            for label, n in counts.items()
        )
        click.echo(f"  {name:<5} {total:>5} images: {shares}")
    if split.skipped:
        click.echo(f"  skipped {len(split.skipped)} unreadable images (see the warnings)")
    if split.field:
        from cellwatch.training.field import is_field_entry

        total = sum(f.samples for f in split.field)
        sources = len({s for f in split.field for s in f.sources})
        where = ", ".join(
            f"{name} {sum(is_field_entry(e, split.field) for e in split.entries(name))}"
            for name in SPLIT_NAMES
        )
        click.echo(
            f"  field: {total} labelled samples from {sources} sources (one group per source, "
            f"near-copies merged): {where}"
        )


@main.command()
@click.argument("idb1", type=_PATH)
@click.argument("idb2", type=_PATH)
@click.option("--out", type=_PATH, required=True, help="groups CSV to write (path,group)")
@click.option("--force", is_flag=True, help="replace an existing groups file")
@friendly_errors
def groups(idb1: Path, idb2: Path, out: Path, force: bool) -> None:
    """Find the ALL-IDB1 smear (IDB1: whole fields) each ALL-IDB2 crop (IDB2) was cut
    from, by template matching, and write a groups file for `prepare --groups`."""
    from cellwatch.training.smears import write_groups

    found = write_groups(idb1, idb2, out, force=force)
    matched = len(found.matches) - len(found.unmatched)
    smears = len({m.smear for m in found.matches if m.smear is not None})
    click.echo(
        f"{matched} of {len(found.matches)} crops matched to {smears} smears; groups "
        f"written to {out}"
    )
    for m in found.unmatched:
        click.echo(f"  unmatched: {m.crop} (best score {m.score:.2f}; a group of its own)")
    for m in found.ambiguous:
        click.echo(
            f"  ambiguous: {m.crop} matches {m.smear} ({m.score:.3f}) and {m.runner_up} "
            f"({m.runner_up_score:.3f}); put in {m.smear}"
        )


@main.command()
@click.argument("split", type=_PATH)
@click.option("--out", type=_PATH, required=True, help="run directory to write")
@click.option(
    "--checkpoint",
    type=_PATH,
    default=None,
    help="TF-Slim inception_v3.ckpt (or a checkpoint prefix/directory); "
    "without it the base starts from random weights",
)
@click.option(
    "--mode", type=click.Choice(["bottleneck", "finetune"]), default="bottleneck", show_default=True
)
@click.option(
    "--trainable-scopes",
    default=None,
    help="finetune: comma-separated scopes [default: InceptionV3/Logits,InceptionV3/AuxLogits]",
)
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option(
    "--lr",
    "learning_rate",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(0, 10, min_open=True),
    help="Adam learning rate",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1))
@click.option(
    "--train-batch-norm",
    is_flag=True,
    help="finetune: batch norm in training mode (TF-Slim's behaviour)",
)
@click.option(
    "--checkpoint-every",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="also save every N epochs (0: final only)",
)
@click.option(
    "--cache",
    "cache_dir",
    type=_PATH,
    default=None,
    help="bottleneck cache directory [default: SPLIT/bottlenecks]",
)
@click.option(
    "--patience",
    default=10,
    show_default=True,
    type=click.IntRange(0),
    help="stop after N epochs without a lower validation loss (0: run all epochs)",
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["cosine", "step", "constant"]),
    default="cosine",
    show_default=True,
    help="cosine decay to 0; step: /10 at 50% and 75% of the epochs",
)
@click.option(
    "--fold",
    type=click.IntRange(0),
    default=None,
    help="cross-validation: train fold i of a `prepare --folds K` split (it is the val split)",
)
@click.option(
    "--depth-multiplier",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="TF-Slim's Inception V3 width: 1.0 is the published network (and the only width "
    "of its ImageNet checkpoint); smaller is the same network narrower, for tests",
)
@click.option("--force", is_flag=True, help="replace an existing run directory")
@friendly_errors
def fit(
    split: Path,
    out: Path,
    checkpoint: Path | None,
    mode: str,
    trainable_scopes: str | None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    train_batch_norm: bool,
    checkpoint_every: int,
    cache_dir: Path | None,
    patience: int,
    lr_schedule: str,
    fold: int | None,
    depth_multiplier: float,
    force: bool,
) -> None:
    """Train on SPLIT (from `prepare`) into the run directory --out; keeps the epoch with the
    lowest validation loss."""
    from cellwatch.training.fit import fit as run_fit
    from cellwatch.training.runinfo import FitConfig

    extra: dict[str, Any] = {}
    if trainable_scopes is not None:
        extra["trainable_scopes"] = [s.strip() for s in trainable_scopes.split(",") if s.strip()]
    config = FitConfig.model_validate(
        {
            "mode": mode,
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "train_batch_norm": train_batch_norm,
            "checkpoint_every": checkpoint_every,
            "patience": patience,
            "lr_schedule": lr_schedule,
            "fold": fold,
            "depth_multiplier": depth_multiplier,
            **extra,
        }
    )
    info = run_fit(split, out, config, base_checkpoint=checkpoint, cache_dir=cache_dir, force=force)
    kept = next(h for h in info.history if h.epoch == info.selected_epoch)
    val = "n/a" if kept.val_accuracy is None else f"{kept.val_accuracy:.3f}"
    base = "RANDOM INIT" if info.base_checkpoint is None else info.base_checkpoint.path
    click.echo(
        f"run {out}: {info.steps} steps from {base}; kept epoch {info.selected_epoch} "
        f"({info.selection}): train accuracy {kept.train_accuracy:.3f}, val accuracy {val}"
        f"{' (SYNTHETIC data)' if info.synthetic else ''}"
    )


@main.command()
@click.argument("runs", type=_PATH, nargs=-1, required=True)
@click.option(
    "--split",
    "split_name",
    type=click.Choice(["test", "val", "train"]),
    default=None,
    help="[default: test for one run; val (each run's held-out fold) for several]",
)
@click.option(
    "--field",
    "field_dirs",
    type=_PATH,
    multiple=True,
    metavar="DIR",
    help="evaluate on the labelled field samples of DIR instead of a split, per reason "
    "(repeatable)",
)
@friendly_errors
def evaluate(runs: tuple[Path, ...], split_name: str | None, field_dirs: tuple[Path, ...]) -> None:
    """Accuracy, sensitivity, specificity, PPV, NPV and ROC AUC with 95% intervals.

    One RUN: its TensorFlow model on one split. Several RUNs (the folds of one
    `prepare --folds K` split, each from `fit --fold i`): each on its held-out fold,
    then the mean and standard deviation over the folds. With --field DIR: one RUN on
    labelled field samples, separately per reason (only `random` samples give an
    unbiased estimate of field accuracy; the others show where the model is weak).
    """
    if field_dirs:
        if len(runs) > 1 or split_name is not None:
            raise click.UsageError("--field takes one RUN and no --split")
        _evaluate_field(runs[0], field_dirs)
        return
    from cellwatch.training.evaluate import cross_validate, eval_dir
    from cellwatch.training.evaluate import evaluate as run_evaluate
    from cellwatch.training.stats import fmt
    from cellwatch.training.stratify import SplitName

    if len(runs) > 1:
        summary = cross_validate(list(runs), cast("SplitName", split_name or "val"))
        for m in summary.per_fold:
            click.echo(
                f"fold {m.fold} ({m.split}, n={m.n}): accuracy {fmt(m.accuracy)}, "
                f"sensitivity {fmt(m.sensitivity)}, specificity {fmt(m.specificity)}"
            )
        click.echo(
            "each fold trained a fixed number of epochs chosen beforehand (its held-out "
            "fold scores it and never chose its epoch)"
        )
        click.echo(
            f"over {len(summary.folds)} of {summary.total_folds} folds"
            f"{', SYNTHETIC data' if summary.per_fold[0].synthetic else ''} (mean ± sd):"
        )
        for name, mean in summary.mean.items():
            sd = summary.sd[name]
            shown = (
                "n/a" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")
            )
            click.echo(f"  {name:<12} {shown}")
        return
    run = runs[0]
    name = cast("SplitName", split_name or "test")  # click.Choice guarantees it
    m = run_evaluate(run, name)
    click.echo(
        f"{m.split} (n={m.n}{', SYNTHETIC data' if m.synthetic else ''}), TensorFlow, "
        f"threshold {m.threshold:g}, 95% intervals:"
    )
    for label, est in (
        ("accuracy", m.accuracy),
        ("sensitivity", m.sensitivity),
        ("specificity", m.specificity),
        ("precision", m.precision),
        ("NPV", m.npv),
        ("ROC AUC", m.roc_auc),
    ):
        click.echo(f"  {label:<12} {fmt(est)}")
    click.echo(f"confusion (rows true {'/'.join(m.labels)}): {m.confusion}")
    if m.units is not None:
        u = m.units.metrics
        click.echo(
            f"per patient/smear ({m.units.units} units): accuracy {fmt(u.accuracy)}, "
            f"sensitivity {fmt(u.sensitivity)}, specificity {fmt(u.specificity)}"
        )
    if m.split == "test" and m.test_reads > 1:
        click.echo(
            f"note: this run has now read its test split {m.test_reads} times; choices made "
            "after looking at test figures make them optimistic"
        )
    click.echo(f"written to {eval_dir(run, name)}")


def _evaluate_field(run: Path, field_dirs: tuple[Path, ...]) -> None:
    from cellwatch.training.field import FIELD_EVAL_DIR, evaluate_field

    _print_field(evaluate_field(run, field_dirs))
    click.echo(f"written to {run / FIELD_EVAL_DIR}")


@main.command()
@click.argument("run", type=_PATH)
@click.option("--out", type=_PATH, required=True, help="bundle directory to write")
@click.option("--name", required=True, help="model name, e.g. all-inception-v3")
@click.option("--version", "model_version", required=True, help="model version, e.g. 1.0.0")
@click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True
)
@click.option("--sign-key", type=_PATH, required=True, help="Ed25519 private key (keygen)")
@click.option(
    "--calibration-size",
    default=300,
    show_default=True,
    type=click.IntRange(1),
    help="int8: training images used to calibrate",
)
@click.option(
    "--min-agreement",
    default=0.98,
    show_default=True,
    type=_FRACTION,
    help="gate: share of decisions (every image of train, val and test) the deployed IR "
    "must share with TensorFlow",
)
@click.option(
    "--max-sensitivity-drop",
    "--max-drop",
    "max_sensitivity_drop",
    default=0.02,
    show_default=True,
    type=_FRACTION,
    help="gate: largest sensitivity drop of the deployed IR against TensorFlow (test split)",
)
@click.option(
    "--max-prob-diff",
    default=0.1,
    show_default=True,
    type=_FRACTION,
    help="gate: largest |p(deployed) - p(TensorFlow)| on any image, every precision",
)
@click.option(
    "--allow-degraded",
    is_flag=True,
    help="export even if the gate fails (recorded; shown as degraded everywhere)",
)
@click.option(
    "--allow-untrained",
    is_flag=True,
    help="export a run trained from random weights (no --checkpoint; labelled untrained)",
)
@click.option(
    "--allow-no-skill",
    is_flag=True,
    help="export a model without evidence of skill on the test split (ROC AUC interval "
    "reaching 0.5, or Brier not better than the prior's; labelled no-skill)",
)
@click.option(
    "--base-is",
    default=None,
    metavar="DESCRIPTION",
    help="what the base checkpoint is when its hash is not the published TF-Slim file's "
    "(recorded; labelled unverified-base); without it such a base is refused",
)
@click.option(
    "--prevalence",
    default=None,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="also give PPV and NPV at this prevalence of ALL in the model card",
)
@click.option(
    "--allow-no-test",
    is_flag=True,
    help="with an empty test split, measure on the validation split (recorded)",
)
@click.option(
    "--int8-method",
    type=click.Choice(["auto", "ptq", "accuracy-control"]),
    default="auto",
    show_default=True,
    help="auto: NNCF accuracy-aware quantisation only when plain post-training "
    "quantisation misses the gate on the validation split; ptq: plain only; "
    "accuracy-control: always",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="fix the decision threshold (p(ALL) >= it is ALL) instead of choosing it on "
    "validation for --target-sensitivity",
)
@click.option(
    "--target-sensitivity",
    default=0.95,
    show_default=True,
    type=_FRACTION,
    help="the decision threshold is chosen on validation to reach this sensitivity",
)
@click.option(
    "--band-half-width",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 0.5, max_open=True),
    help="low-confidence band: at least this far either side of the threshold",
)
@click.option(
    "--field",
    "field_dirs",
    type=_PATH,
    multiple=True,
    metavar="DIR",
    help="also measure the deployed model on the labelled field samples of DIR, per reason; "
    "recorded in the manifest and the model card (repeatable)",
)
@click.option("--force", is_flag=True, help="replace an existing bundle directory")
@friendly_errors
def export(
    run: Path,
    out: Path,
    name: str,
    model_version: str,
    precision: str,
    sign_key: Path,
    calibration_size: int,
    min_agreement: float,
    max_sensitivity_drop: float,
    max_prob_diff: float,
    allow_degraded: bool,
    allow_untrained: bool,
    allow_no_skill: bool,
    base_is: str | None,
    prevalence: float | None,
    allow_no_test: bool,
    int8_method: str,
    threshold: float | None,
    target_sensitivity: float,
    band_half_width: float,
    field_dirs: tuple[Path, ...],
    force: bool,
) -> None:
    """Calibrate, freeze RUN, check its skill, convert to OpenVINO IR, measure the IR
    itself, gate, and write a signed bundle to --out. Exit code 3: the model shows no
    skill, or the deployed model fails the fidelity gate."""
    from cellwatch.training.export import ExportOptions, Int8Method
    from cellwatch.training.export import export as run_export
    from cellwatch.training.ir import Precision
    from cellwatch.training.stats import fmt

    prec = cast(Precision, precision)  # click.Choice guarantees it
    bundle = run_export(
        run,
        out,
        ExportOptions(
            name=name,
            version=model_version,
            precision=prec,
            sign_key=sign_key,
            force=force,
            calibration_size=calibration_size,
            min_agreement=min_agreement,
            max_sensitivity_drop=max_sensitivity_drop,
            max_prob_diff=max_prob_diff,
            allow_degraded=allow_degraded,
            allow_untrained=allow_untrained,
            allow_no_skill=allow_no_skill,
            base_is=base_is,
            prevalence=prevalence,
            allow_no_test=allow_no_test,
            int8_method=cast(Int8Method, int8_method),
            threshold=threshold,
            target_sensitivity=target_sensitivity,
            band_half_width=band_half_width,
            field=field_dirs,
        ),
    )
    m = bundle.manifest
    figures, p = m.figures, m.provenance
    flags = ", ".join(f.upper() for f in m.flags)
    click.echo(f"bundle {bundle} ({prec}) written to {out}{f' [{flags}]' if flags else ''}")
    if figures is None:  # pragma: no cover - export always writes them
        return
    dep, tf = figures.deployed, figures.tensorflow.metrics
    click.echo(
        f"deployed {prec} IR on {dep.device} ({dep.inference_precision}, {dep.machine}), "
        f"{figures.split} split n={figures.n}, threshold {dep.metrics.threshold:.3f}, "
        "95% intervals:"
    )
    for label, key in (
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("ROC AUC", "roc_auc"),
    ):
        click.echo(
            f"  {label:<12} {fmt(getattr(dep.metrics, key))}   "
            f"(TensorFlow {fmt(getattr(tf, key), counts=False)})"
        )
    if figures.units is not None:
        u = figures.units
        click.echo(
            f"  per patient/smear ({u.units} units): sensitivity {fmt(u.metrics.sensitivity)}, "
            f"specificity {fmt(u.metrics.specificity)}"
        )
    gate, quality = p.gate, p.quality
    if figures.agreement_all is not None:
        click.echo(f"  agreement with TensorFlow, every image: {fmt(figures.agreement_all, 3)}")
    if gate is not None:
        drop = "n/a" if gate.sensitivity_drop is None else f"{gate.sensitivity_drop:.3f}"
        click.echo(
            f"  fidelity gate: sensitivity drop {drop}, max |p difference| "
            f"{gate.max_prob_diff or 0.0:.3g}: "
            + ("passed" if gate.passed else "FAILED (overridden: --allow-degraded)")
        )
    if quality is not None:
        click.echo(
            "  quality floor: ROC AUC lower bound "
            + ("n/a" if quality.auc_ci_low is None else f"{quality.auc_ci_low:.2f}")
            + ", Brier "
            f"{quality.brier:.3f} vs prior {quality.prior_brier:.3f}: "
            + ("passed" if quality.passed else "FAILED (overridden: --allow-no-skill)")
        )
    if m.calibration is not None:
        c = m.calibration
        click.echo(
            f"  calibration: T {c.temperature:.3g} {'applied' if c.applied else 'NOT applied'}"
            f"{f' ({c.note})' if c.note else ''}"
        )
        if c.test is not None:
            t = c.test
            click.echo(
                f"  on the {t.split} split: NLL {t.nll:.3f} "
                f"(uncalibrated {t.nll_uncalibrated:.3f}), "
                f"ECE {t.ece:.3f}, Brier {t.brier:.3f}; {t.errors_in_band} of {t.errors} "
                "errors inside the low-confidence band"
            )
    if figures.field is not None:
        _print_field(figures.field, "  ")


def _print_field(ev: FieldEvaluation, indent: str = "") -> None:
    """Field figures per reason (the unbiased `random` first), then all together."""
    from cellwatch.shared.samples import UNBIASED_REASON, SampleReason
    from cellwatch.training.stats import fmt

    click.echo(
        f"{indent}field samples (n={ev.all.n}{', SYNTHETIC-trained model' if ev.synthetic else ''}"
        f"), {ev.model}, threshold {ev.threshold:.3g}, 95% intervals:"
    )
    reasons = sorted(SampleReason, key=lambda r: r != UNBIASED_REASON)  # random first
    for name, fig in [*((r.value, ev.per_reason[r]) for r in reasons), ("all", ev.all)]:
        what = {UNBIASED_REASON.value: " (unbiased)", "all": " (together)"}.get(name, " (hard)")
        if fig.metrics is None:
            click.echo(f"{indent}  {name}{what}: n=0, no samples, no figures")
            continue
        m = fig.metrics
        dates = f"{fig.first:%Y-%m-%d} to {fig.last:%Y-%m-%d}" if fig.first and fig.last else ""
        click.echo(f"{indent}  {name}{what}: n={fig.n} ({fig.sources} sources, collected {dates})")
        for label, est in (
            ("accuracy", m.accuracy),
            ("sensitivity", m.sensitivity),
            ("specificity", m.specificity),
            ("ROC AUC", m.roc_auc),
        ):
            click.echo(f"{indent}    {label:<12} {fmt(est)}")
    if ev.excluded:
        click.echo(
            f"{indent}left out {ev.excluded} samples: (near-)copies of images this run trained "
            "or validated on"
        )
    click.echo(f"{indent}note: {ev.note}")


@main.command()
@click.argument("directory", type=_PATH)
@click.option("--name", default="cellwatch", show_default=True, help="key file name stem")
@click.option("--force", is_flag=True, help="replace an existing key pair")
@friendly_errors
def keygen(directory: Path, name: str, force: bool) -> None:
    """Make an Ed25519 key pair NAME.key / NAME.pub in DIRECTORY for signing bundles."""
    from cellwatch.shared.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(directory, name, overwrite=force)
    click.echo(
        f"key {key_id(load_public_key(public))}: private {private} (keep secret), "
        f"public {public} (copy to the nodes' and hub's trusted-keys directory)"
    )


@main.command()
@click.argument("bundle", type=_PATH)
@click.option("--key", "key_path", type=_PATH, required=True, help="Ed25519 private key (keygen)")
@friendly_errors
def sign(bundle: Path, key_path: Path) -> None:
    """Sign BUNDLE (a directory) again with another key, for a key rotation: the
    manifest is unchanged, so it stays the same model (`cellwatch-hub push` it again)."""
    from cellwatch.shared.bundle import resign_bundle
    from cellwatch.shared.signing import key_id, load_private_key

    key = load_private_key(key_path)
    sha = resign_bundle(bundle, key)
    click.echo(
        f"bundle {bundle} ({sha[:12]}) signed by key {key_id(key.public_key())}; push it to "
        "the hub again to replace its signature there"
    )
