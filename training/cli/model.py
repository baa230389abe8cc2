"""`cellwatch-train fit | evaluate`: training a run and measuring it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from cellwatch.shared.cli import friendly_errors
from cellwatch.training.cli.options import PATH

if TYPE_CHECKING:
    from cellwatch.shared.figures import FieldEvaluation


@click.command()
@click.argument("split", type=PATH)
@click.option("--out", type=PATH, required=True, help="run directory to write")
@click.option(
    "--checkpoint",
    type=PATH,
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
    type=PATH,
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


@click.command()
@click.argument("runs", type=PATH, nargs=-1, required=True)
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
    type=PATH,
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

    print_field(evaluate_field(run, field_dirs))
    click.echo(f"written to {run / FIELD_EVAL_DIR}")


def print_field(ev: FieldEvaluation, indent: str = "") -> None:
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
