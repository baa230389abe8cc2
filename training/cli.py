"""`cellwatch-train`: synth, prepare, fit, evaluate, export, keygen, sign.

Only argument parsing and printing; the work is in the library modules, imported
inside each command so `--help` does not load TensorFlow. Every CellwatchError
(a user's mistake or a failed check) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import click

from cellwatch.shared.errors import CellwatchError
from cellwatch.training.progress import setup_logging

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger("cellwatch.training")

_PATH = click.Path(path_type=Path)


def friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CellwatchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """Train the cellwatch ALL classifier (TF-Slim Inception V3) and export signed bundles.

    Research use only; not for diagnosis.
    """
    setup_logging(verbose)


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
@click.option("--force", is_flag=True, help="replace an existing synthetic folder")
@friendly_errors
def synth(out: Path, count: int, seed: int, size: int, image_format: str, force: bool) -> None:
    """Write a SYNTHETIC blood-smear data set (ALL-IDB names) into OUT, for demos and tests."""
    from cellwatch.training.synth import ImageFormat, write_dataset

    info = write_dataset(
        out, count, seed, size=size, force=force, image_format=cast(ImageFormat, image_format)
    )
    click.echo(f"wrote {info.count} SYNTHETIC images ({info.format}, seed {info.seed}) to {out}")


@main.command()
@click.argument("data", type=_PATH)
@click.option("--out", type=_PATH, required=True, help="split directory to write")
@click.option("--val", default=0.15, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--test", default=0.15, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--force", is_flag=True, help="replace an existing split directory")
@friendly_errors
def prepare(data: Path, out: Path, val: float, test: float, seed: int, force: bool) -> None:
    """Check DATA's images and split them by source image (stratified) into --out."""
    from cellwatch.training.split import SPLIT_NAMES
    from cellwatch.training.split import prepare as run_prepare

    split = run_prepare(data, out, val=val, test=test, seed=seed, force=force)
    tag = " SYNTHETIC" if split.synthetic else ""
    click.echo(f"{split.layout}{tag} data in {split.data_root}; split written to {out}")
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
    force: bool,
) -> None:
    """Train on SPLIT (from `prepare`) into the run directory --out."""
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
            **extra,
        }
    )
    info = run_fit(split, out, config, base_checkpoint=checkpoint, cache_dir=cache_dir, force=force)
    last = info.history[-1]
    val = "n/a" if last.val_accuracy is None else f"{last.val_accuracy:.3f}"
    base = "RANDOM INIT" if info.base_checkpoint is None else info.base_checkpoint.path
    click.echo(
        f"run {out}: {info.steps} steps from {base}; train accuracy "
        f"{last.train_accuracy:.3f}, val accuracy {val}"
        f"{' (SYNTHETIC data)' if info.synthetic else ''}"
    )


@main.command()
@click.argument("run", type=_PATH)
@click.option(
    "--split",
    "split_name",
    type=click.Choice(["test", "val", "train"]),
    default="test",
    show_default=True,
)
@friendly_errors
def evaluate(run: Path, split_name: str) -> None:
    """Accuracy, sensitivity, specificity, F1, ROC AUC and confusion matrix of RUN."""
    from cellwatch.training.evaluate import eval_dir
    from cellwatch.training.evaluate import evaluate as run_evaluate
    from cellwatch.training.split import SplitName

    name = cast("SplitName", split_name)  # click.Choice guarantees it
    m = run_evaluate(run, name)
    auc = "n/a" if m.roc_auc is None else f"{m.roc_auc:.3f}"
    click.echo(
        f"{m.split} (n={m.n}{', SYNTHETIC data' if m.synthetic else ''}): "
        f"accuracy {m.accuracy:.3f}, precision {m.precision:.3f}, "
        f"sensitivity {m.recall:.3f}, specificity {m.specificity:.3f}, F1 {m.f1:.3f}, "
        f"ROC AUC {auc}"
    )
    click.echo(f"confusion (rows true {'/'.join(m.labels)}): {m.confusion}")
    click.echo(f"written to {eval_dir(run, name)}")


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
    "--low-confidence",
    default=0.6,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="the bundle's low_confidence_threshold",
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
    low_confidence: float,
    force: bool,
) -> None:
    """Freeze RUN, convert to OpenVINO IR, and write a signed bundle to --out."""
    from cellwatch.training.export import ExportOptions
    from cellwatch.training.export import export as run_export
    from cellwatch.training.ir import Precision

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
            low_confidence_threshold=low_confidence,
        ),
    )
    agreement = bundle.manifest.metrics["ir_agreement"]
    click.echo(
        f"bundle {bundle} ({prec}) written to {out}; IR vs frozen.pb: max |dp| "
        f"{agreement['max_abs_diff']:.2g}, top-1 agreement "
        f"{agreement['top1_agreement']:.3f} on {agreement['n']} images"
    )


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
