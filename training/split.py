"""`prepare`: a stratified train/val/test split by group, written as split.json.

The split is made from the original files, before any augmentation (augmentation
happens on the fly during `fit`, on training images only), and by group (dealt in
stratify.py): a group is a file, or, with `--groups groups.csv`, a patient or smear
(groups.py); files with identical bytes always join one group. A group never
straddles two splits. This is what the original workflow got wrong: it augmented first
and split afterwards, so copies of a training image sat in the validation set.
Near-duplicates across splits (perceptual hash) are reported, and refused with `strict`.

`folds=K` makes grouped, stratified K-fold cross-validation: the test split is held
out as usual and every other group is dealt to one of K folds (per class, in a
seeded order). `split.for_fold(i)` is the view `fit --fold i` trains on: fold i is
the validation split, the other folds the training split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from cellwatch.shared.base import Strict
from cellwatch.training import LABELS
from cellwatch.training.dataset import (
    ImageEntry,
    Skipped,
    find_images,
    fingerprint,
    inspect,
    relative,
    sha256_hex,
)
from cellwatch.training.errors import DataError
from cellwatch.training.field import FieldSamples, FieldSource, load_field
from cellwatch.training.groups import NearDuplicate, near_duplicates, read_groups
from cellwatch.training.leakage import Merge, feature_pairs, merged_groups, phash_pairs
from cellwatch.training.outdir import staged_dir
from cellwatch.training.stratify import (
    SPLIT_NAMES,
    SplitName,
    assign_folds,
    stratified_split,
)

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
Grouping = Literal["file", "groups-file"]
FieldInto = Literal["split", "train"]
"""Where `prepare --field` puts the field samples: dealt like any group (one per source),
or all into training (with every image of the data set they share a group with), for a
lab that measures on held-out field samples of its own with `evaluate --field`."""
MAX_FOLDS = 20
LEAK_WARNING = (
    "each file is its own group: ALL-IDB2 crops come from ALL-IDB1 smears and several "
    "smears come from one patient, so images of one patient can land in both training "
    "and test; give the patient or smear of every file with --groups groups.csv"
)


class SplitFile(Strict):
    """split.json: which image is in which split, and fingerprints of each."""

    schema_: Literal["cellwatch.split/1"] = Field("cellwatch.split/1", alias="schema")
    created_at: datetime
    data_root: str = Field(description="absolute path of the data folder")
    layout: str
    synthetic: bool = Field(description="true when the data came from `cellwatch-train synth`")
    labels: list[str] = Field(default_factory=lambda: list(LABELS))
    seed: int = Field(ge=0)
    val_fraction: float = Field(ge=0.0, lt=1.0)
    test_fraction: float = Field(ge=0.0, lt=1.0)
    splits: dict[SplitName, list[ImageEntry]]
    fingerprints: dict[str, str] = Field(description="per split and `all` (dataset.fingerprint)")
    skipped: list[Skipped] = Field(default_factory=list, description="files that did not decode")
    grouping: Grouping = Field(
        "file", description="file: each file its own group; groups-file: from --groups"
    )
    groups_file_sha256: str | None = None
    near_duplicates: list[NearDuplicate] = Field(
        default_factory=list, description="pHash near-duplicates in different splits"
    )
    merged: list[Merge] = Field(
        default_factory=list,
        description="near-duplicate pairs merged into one group before the split (leakage.py)",
    )
    leakage_check: str = Field(
        "none", description="how near-duplicates were looked for before the split"
    )
    folds: int = Field(0, ge=0, le=MAX_FOLDS, description="K of K-fold cross-validation, or 0")
    field: list[FieldSource] = Field(
        default_factory=list,
        description="labelled field directories whose samples joined (prepare --field; "
        "their entries' paths are absolute, their groups field:{source})",
    )
    field_into: FieldInto = Field(
        "split", description="where the field samples went: dealt by group, or into training"
    )
    fold: int | None = Field(None, ge=0, description="set on the view of one fold (for_fold)")

    @property
    def root(self) -> Path:
        return Path(self.data_root)

    def for_fold(self, fold: int | None) -> SplitFile:
        """The split a run uses: itself, or for a K-fold split the view of fold `fold`."""
        if fold is None:
            if self.folds:
                raise DataError(
                    f"this split has {self.folds} cross-validation folds: "
                    f"pass --fold 0..{self.folds - 1}"
                )
            return self
        if not self.folds:
            raise DataError("--fold needs a split made with `prepare --folds K`")
        if not 0 <= fold < self.folds:
            raise DataError(
                f"--fold {fold} is out of range: this split has folds 0..{self.folds - 1}"
            )
        pool = self.entries("train")
        train = [e for e in pool if e.fold != fold]
        val = [e for e in pool if e.fold == fold]
        return self.model_copy(
            update={
                "splits": {"train": train, "val": val, "test": self.entries("test")},
                "fingerprints": {
                    **self.fingerprints,
                    "train": fingerprint(train),
                    "val": fingerprint(val),
                },
                "fold": fold,
            }
        )

    def entries(self, split: SplitName) -> list[ImageEntry]:
        return list(self.splits.get(split, []))

    def class_counts(self, split: SplitName) -> dict[str, int]:
        counts = {name: 0 for name in self.labels}
        for e in self.entries(split):
            counts[self.labels[e.label]] += 1
        return counts


def prepare(
    data: Path,
    out: Path,
    *,
    val: float,
    test: float,
    seed: int,
    force: bool = False,
    groups_file: Path | None = None,
    folds: int = 0,
    strict: bool = False,
    allow_near_duplicates: bool = False,
    checkpoint: Path | None = None,
    depth_multiplier: float = 1.0,
    field: Sequence[Path] = (),
    field_into: FieldInto = "split",
) -> SplitFile:
    """Scan data, check every image, add the labelled samples of the field directories
    (field.py: one group per source), merge near-duplicates into groups (unless
    allow_near_duplicates; by bottleneck features too with a base checkpoint), split,
    and write out/split.json (all or nothing)."""
    if folds == 1 or not 0 <= folds <= MAX_FOLDS:
        raise DataError(f"--folds must be 0 (no cross-validation) or 2..{MAX_FOLDS}, not {folds}")
    if folds and val:
        raise DataError("--folds replaces the validation split: leave --val out (or 0)")
    scan = find_images(data)
    named = {c.label for c in scan.candidates}
    if len(named) < len(LABELS):
        have = ", ".join(LABELS[i] for i in sorted(named))
        raise DataError(f"{data} holds one class only ({have}); both normal and ALL are needed")
    samples = load_field(field) if field else None
    groups = None
    if groups_file is not None:
        groups = read_groups(groups_file, [relative(scan, c) for c in scan.candidates])
    log.info(
        "%s: %s layout, %d image files%s",
        scan.root,
        scan.layout,
        len(scan.candidates),
        " (SYNTHETIC)" if scan.synthetic else "",
    )
    if groups is None and not scan.synthetic:
        log.warning("%s", LEAK_WARNING)
    with staged_dir(out, marker=SPLIT_FILE, force=force, what="split") as tmp:
        found = inspect(scan, groups)
        entries, skipped = found.entries, found.skipped
        synthetic = scan.synthetic or bool(found.synthetic)
        if found.synthetic and not scan.synthetic:
            log.warning(
                "%d of %d images carry the SYNTHETIC tag of `cellwatch-train synth` "
                "(e.g. %s): the split is flagged synthetic",
                len(found.synthetic),
                len(entries),
                found.synthetic[0],
            )
        if not entries:
            raise DataError(f"no image in {data} could be decoded ({len(skipped)} skipped)")
        if samples is not None:
            entries = entries + samples.entries
            log.info(
                "%d labelled field samples from %d sources joined the data set",
                len(samples.entries),
                len({e.group for e in samples.entries}),
            )
        merges: list[Merge] = []
        check = "none (--allow-near-duplicates)"
        if not allow_near_duplicates:
            entries, merges, check = _merge_near_duplicates(
                scan.root, entries, checkpoint, depth_multiplier, tmp
            )
        forced: list[ImageEntry] = []
        if samples is not None and field_into == "train":
            entries, forced = _field_groups_apart(entries, samples)
        splits = stratified_split(entries, val, test, seed)
        splits["train"] = sorted(splits["train"] + forced, key=lambda e: e.path)
        entries = entries + forced
        if folds:
            splits["train"] = sorted(
                assign_folds(splits["train"], folds, seed), key=lambda e: e.path
            )
        duplicates = near_duplicates(
            {name: [(e.path, e.phash) for e in items] for name, items in splits.items()}
        )
        _report_duplicates(duplicates, strict)
        prints: dict[str, str] = {name: fingerprint(items) for name, items in splits.items()}
        prints["all"] = fingerprint(entries)
        split = SplitFile(
            created_at=datetime.now(UTC),
            data_root=str(scan.root),
            layout=scan.layout,
            synthetic=synthetic,
            seed=seed,
            val_fraction=val,
            test_fraction=test,
            splits=splits,
            fingerprints=prints,
            skipped=skipped,
            grouping="groups-file" if groups is not None else "file",
            groups_file_sha256=sha256_hex(groups_file.read_bytes()) if groups_file else None,
            near_duplicates=duplicates,
            merged=merges,
            leakage_check=check,
            folds=folds,
            field=samples.sources() if samples is not None else [],
            field_into=field_into,
        )
        (tmp / SPLIT_FILE).write_text(split.model_dump_json(by_alias=True, indent=2) + "\n")
    for name in SPLIT_NAMES:
        log.info("%-5s %s", name, split.class_counts(name))
    return split


def _field_groups_apart(
    entries: list[ImageEntry], samples: FieldSamples
) -> tuple[list[ImageEntry], list[ImageEntry]]:
    """(the entries dealt as usual, those that go to training with the field samples): a
    field sample's group, after near-duplicates were merged, and any image with a field
    sample's bytes go with it, so no near-copy of a field sample lands in val or test."""
    field_paths = {e.path for e in samples.entries}
    groups = {e.group for e in entries if e.path in field_paths}
    shas = {e.sha256 for e in entries if e.path in field_paths}
    apart = [e for e in entries if e.group in groups or e.sha256 in shas]
    kept = [e for e in entries if not (e.group in groups or e.sha256 in shas)]
    log.info(
        "%d field samples into the training split (--field-into train), with %d images "
        "of the data set that are near-copies of them",
        len(field_paths),
        len(apart) - len(field_paths),
    )
    return kept, apart


def _merge_near_duplicates(
    root: Path,
    entries: list[ImageEntry],
    checkpoint: Path | None,
    depth_multiplier: float,
    out: Path,
) -> tuple[list[ImageEntry], list[Merge], str]:
    """Entries with near-duplicates in one group, the merges, and what was checked."""
    paths = [e.path for e in entries]
    merges = phash_pairs(paths, [e.phash for e in entries])
    check = "perceptual hash"
    if checkpoint is not None:
        from cellwatch.training.bottleneck import base_features
        from cellwatch.training.fit import BOTTLENECK_CACHE_DIR

        features = base_features(
            root, entries, checkpoint, depth_multiplier, out / BOTTLENECK_CACHE_DIR
        )
        merges += feature_pairs(paths, features)
        check = f"perceptual hash and bottleneck features of {checkpoint.name}"
    else:
        log.warning(
            "near-duplicates checked by perceptual hash only: crops, small rotations, shifts "
            "and equalised copies are found by the network's features (prepare --checkpoint)"
        )
    if not merges:
        return entries, [], check
    groups = merged_groups({e.path: e.group for e in entries}, merges)
    for m in merges:
        log.warning(
            "near-duplicates put into one group: %s and %s (%s %s)",
            m.a,
            m.b,
            m.by,
            f"{m.distance:.0f} bits apart" if m.by == "phash" else f"cosine {m.distance:.3f}",
        )
    merged = [e.model_copy(update={"group": groups[e.path]}) for e in entries]
    return merged, merges, check


def _report_duplicates(duplicates: list[NearDuplicate], strict: bool) -> None:
    for d in duplicates:
        log.warning(
            "near-duplicate images in different splits: %s (%s) and %s (%s), %d bits apart",
            d.a,
            d.a_split,
            d.b,
            d.b_split,
            d.distance,
        )
    if duplicates and strict:
        first = duplicates[0]
        raise DataError(
            f"{len(duplicates)} near-duplicate pairs straddle splits (e.g. {first.a} in "
            f"{first.a_split} and {first.b} in {first.b_split}): put copies in one group "
            "with --groups, or remove them (--strict)"
        )


def load_split(path: Path) -> SplitFile:
    """Read a split directory (or its split.json)."""
    file = path / SPLIT_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{path} is not a split made by `cellwatch-train prepare` (no {SPLIT_FILE})"
        )
    try:
        split = SplitFile.model_validate_json(file.read_bytes())
    except ValidationError as exc:
        raise DataError(f"{file} is not a valid split file: {exc.errors()[0]['msg']}") from exc
    recomputed = recompute_fingerprints(split)
    changed = [k for k, v in recomputed.items() if split.fingerprints.get(k) != v]
    if changed:
        raise DataError(
            f"{file} was changed after `prepare`: the {', '.join(changed)} fingerprint no longer "
            "matches its images (an image moved between splits, or a label changed); run "
            "prepare again"
        )
    return split


def recompute_fingerprints(split: SplitFile) -> dict[str, str]:
    """Each split's fingerprint (and `all`'s) from its entries, not from what split.json says."""
    prints: dict[str, str] = {name: fingerprint(split.entries(name)) for name in SPLIT_NAMES}
    prints["all"] = fingerprint([e for name in SPLIT_NAMES for e in split.entries(name)])
    return prints


def verify_files(split: SplitFile) -> None:
    """Hash every image again: DataError naming the first file whose bytes changed."""
    for name in SPLIT_NAMES:
        for e in split.entries(name):
            path = split.root / e.path
            try:
                digest = sha256_hex(path.read_bytes())
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc.strerror}") from exc
            if digest != e.sha256:
                raise DataError(
                    f"{path} changed since `prepare` (SHA-256 differs): the split no longer "
                    "describes its images; run prepare again"
                )
