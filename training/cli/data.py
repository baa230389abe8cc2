"""`cellwatch-train synth | prepare | groups`: the images a model learns from."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import click

from cellwatch.shared.cli import friendly_errors
from cellwatch.training.cli.options import PATH


@click.command()
@click.argument("out", type=PATH)
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


@click.command()
@click.argument("data", type=PATH)
@click.option("--out", type=PATH, required=True, help="split directory to write")
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
    type=PATH,
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
    type=PATH,
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
    type=PATH,
    multiple=True,
    metavar="DIR",
    help="a labelled field directory (`cellwatch-hub samples export`, labels filled in); "
    "its samples join the data set, one group per source (repeatable)",
)
@click.option(
    "--field-into",
    type=click.Choice(["split", "train"]),
    default="split",
    show_default=True,
    help="split: the field samples are dealt like any group (one per source); train: all "
    "of them (and their near-copies in DATA) go to the training split, for a lab that "
    "holds out field samples of its own for `evaluate --field`",
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
    field_into: str,
    force: bool,
) -> None:
    """Check DATA's images (and --field samples), merge near-duplicates into one group, and
    split them by group (file, or --groups; a field source), stratified, into --out."""
    from cellwatch.training.split import LEAK_WARNING, FieldInto
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
        field_into=cast(FieldInto, field_into),  # click.Choice guarantees it
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


@click.command()
@click.argument("idb1", type=PATH)
@click.argument("idb2", type=PATH)
@click.option("--out", type=PATH, required=True, help="groups CSV to write (path,group)")
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
