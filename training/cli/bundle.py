"""`cellwatch-train export | keygen | sign`: a signed bundle from a run, and its keys."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import click

from cellwatch.shared.cli import friendly_errors
from cellwatch.training.cli.model import print_field
from cellwatch.training.cli.options import FRACTION, PATH


@click.command()
@click.argument("run", type=PATH)
@click.option("--out", type=PATH, required=True, help="bundle directory to write")
@click.option("--name", required=True, help="model name, e.g. all-inception-v3")
@click.option("--version", "model_version", required=True, help="model version, e.g. 1.0.0")
@click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True
)
@click.option("--sign-key", type=PATH, required=True, help="Ed25519 private key (keygen)")
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
    type=FRACTION,
    help="gate: share of decisions (every image of train, val and test) the deployed IR "
    "must share with TensorFlow",
)
@click.option(
    "--max-sensitivity-drop",
    "--max-drop",
    "max_sensitivity_drop",
    default=0.02,
    show_default=True,
    type=FRACTION,
    help="gate: largest sensitivity drop of the deployed IR against TensorFlow (test split)",
)
@click.option(
    "--max-prob-diff",
    default=0.1,
    show_default=True,
    type=FRACTION,
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
    type=FRACTION,
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
    type=PATH,
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
        print_field(figures.field, "  ")


@click.command()
@click.argument("directory", type=PATH)
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


@click.command()
@click.argument("bundle", type=PATH)
@click.option("--key", "key_path", type=PATH, required=True, help="Ed25519 private key (keygen)")
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
