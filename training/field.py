"""Labelled field samples (shared/samples.py) as training images, and the figures of a run
on them (`prepare --field DIR`, `evaluate RUN --field DIR`).

- In `prepare`, every labelled sample joins the data set as an image whose group is
  `field:{source}`: all samples of one source (a lab or microscope) are one group and
  land in one split. samples.csv names no patient or smear, and one source sends many
  images of the same patients, stains and microscope, so the source is the finest unit
  known to be independent; grouping by it is what keeps a source's images from
  sitting on both sides of a split. Near-duplicates between field samples and the data
  set (or among field samples) are then merged like any others (leakage.py), so a field
  image and its near-copy always share a split. A field entry's `path` is the sample
  file's absolute path (it lies outside the data folder; `root / path` still finds it).
- Unlabelled rows, unknown labels, repeated ids, rows without images and images
  without rows are refused (SampleError, every problem with its line), never skipped
  or guessed: a half-labelled directory would silently bias the set toward the cases
  labelled first.
- `evaluate --field` reports the run's figures separately per reason and for all
  samples together. Only `random` samples estimate field accuracy without bias
  (shared.samples.UNBIASED_NOTE). Samples that are (near-)copies of the run's own
  training or validation images are left out and counted: the run has seen them.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import Field

from cellwatch.node.decode import ImageError, decode_image
from cellwatch.shared.base import Strict
from cellwatch.shared.figures import FieldEvaluation, FieldFigures
from cellwatch.shared.samples import (
    SAMPLES_CSV,
    UNBIASED_NOTE,
    SampleReason,
    SampleRow,
    SampleSet,
    read_samples,
)
from cellwatch.training import IMAGE_SIZE, LABELS
from cellwatch.training.dataset import LIMITS, ImageEntry, sha256_hex
from cellwatch.training.errors import DataError
from cellwatch.training.groups import near_duplicates, phash
from cellwatch.training.outdir import staged_dir
from cellwatch.training.stats import metric_set

log = logging.getLogger(__name__)

FIELD_GROUP_PREFIX = "field:"
FIELD_EVAL_DIR = "eval-field"
FIELD_FILE = "field.json"
EVAL_THRESHOLD = 0.5
"""`evaluate`'s threshold for a run's TensorFlow model (export chooses the bundle's own)."""


class FieldSource(Strict):
    """One field directory a split took samples from (split.json `field`)."""

    directory: str = Field(description="absolute path of the field directory")
    samples: int = Field(ge=0)
    sources: list[str]
    csv_sha256: str = Field(description="SHA-256 of its samples.csv when prepared")


@dataclass(frozen=True)
class FieldSamples:
    """The labelled samples of one or more field directories, as images."""

    sets: list[SampleSet]
    rows: list[SampleRow]
    entries: list[ImageEntry]

    def sources(self) -> list[FieldSource]:
        return [
            FieldSource(
                directory=str(s.directory),
                samples=len(s.rows),
                sources=sorted({r.source for r in s.rows}),
                csv_sha256=sha256_hex((s.directory / SAMPLES_CSV).read_bytes()),
            )
            for s in self.sets
        ]


def is_field_entry(entry: ImageEntry, field: Sequence[FieldSource]) -> bool:
    """Whether a split entry is a field sample (its path lies in a field directory)."""
    return any(entry.path.startswith(f"{Path(f.directory).as_posix()}/") for f in field)


def field_group(source: str) -> str:
    return f"{FIELD_GROUP_PREFIX}{source}"


def load_field(directories: Sequence[Path]) -> FieldSamples:
    """Read and check every field directory (SampleError on any problem), then decode and
    hash each sample (DataError naming an image that does not decode)."""
    sets = [read_samples(d.resolve(), LABELS, require_labels=True) for d in directories]
    rows: list[SampleRow] = []
    entries: list[ImageEntry] = []
    seen: dict[str, Path] = {}
    for s in sets:
        for row in s.rows:
            path = s.path(row)
            if row.id in seen:
                raise DataError(
                    f"sample {row.id[:12]}... is in two field directories ({seen[row.id]} and "
                    f"{s.directory}): give each sample once"
                )
            seen[row.id] = s.directory
            data = path.read_bytes()
            try:
                rgb = decode_image(data, LIMITS, target_size=IMAGE_SIZE)
            except ImageError as exc:
                raise DataError(f"field sample {path} does not decode: {exc}") from exc
            rows.append(row)
            entries.append(
                ImageEntry(
                    path=path.as_posix(),
                    label=LABELS.index(row.label or ""),
                    sha256=sha256_hex(data),
                    size=len(data),
                    group=field_group(row.source),
                    phash=phash(rgb),
                )
            )
    return FieldSamples(sets, rows, entries)


def seen_by_run(field: FieldSamples, seen: Sequence[ImageEntry]) -> dict[str, str]:
    """Field sample id -> why it is left out: its bytes or a near-copy (pHash) are among
    `seen` (the run's training and validation images)."""
    hashes = {e.sha256 for e in seen}
    out = {r.id: "in the run's training data" for r in field.rows if r.id in hashes}
    pairs = near_duplicates(
        {
            "field": [(e.path, e.phash) for e in field.entries],
            "seen": [(e.path, e.phash) for e in seen],
        }
    )
    by_path = {e.path: r.id for e, r in zip(field.entries, field.rows, strict=True)}
    for p in pairs:
        out.setdefault(by_path[p.a], f"a near-copy of {Path(p.b).name} ({p.distance} bits)")
    return out


@dataclass(frozen=True)
class Unseen:
    """The field samples a model is measured on: those it has not trained or validated on."""

    directories: list[str]
    rows: list[SampleRow]
    entries: list[ImageEntry]
    excluded: int


def unseen_samples(field: FieldSamples, seen: Sequence[ImageEntry]) -> Unseen:
    """field without the samples that are (near-)copies of seen (logged); DataError when
    none is left."""
    left_out = seen_by_run(field, seen)
    for sample, why in left_out.items():
        log.warning("field sample %s left out: %s", sample[:12], why)
    keep = [i for i, r in enumerate(field.rows) if r.id not in left_out]
    if not keep:
        raise DataError(
            f"every one of the {len(field.rows)} field samples is (a near-copy of) an image "
            "this run trained or validated on: nothing left to evaluate"
        )
    return Unseen(
        directories=[str(s.directory) for s in field.sets],
        rows=[field.rows[i] for i in keep],
        entries=[field.entries[i] for i in keep],
        excluded=len(left_out),
    )


def field_figures(
    unseen: Unseen, p_all: Sequence[float], threshold: float, *, model: str, synthetic: bool
) -> FieldEvaluation:
    """Figures per reason and for all samples (stats.metric_set; a reason with no samples
    has n = 0 and no figures)."""
    rows = unseen.rows
    y = np.array([LABELS.index(r.label or "") for r in rows], np.int64)
    p = np.asarray(p_all, np.float64)

    def figures(mask: np.ndarray) -> FieldFigures:
        chosen = [r for r, m in zip(rows, mask, strict=True) if m]
        times = [r.collected_at for r in chosen]
        return FieldFigures(
            n=len(chosen),
            sources=len({r.source for r in chosen}),
            first=min(times) if times else None,
            last=max(times) if times else None,
            metrics=metric_set(y[mask], p[mask], threshold) if chosen else None,
        )

    return FieldEvaluation(
        model=model,
        directories=unseen.directories,
        threshold=threshold,
        per_reason={
            reason: figures(np.array([r.reason == reason for r in rows], bool))
            for reason in SampleReason
        },
        all=figures(np.ones(len(rows), bool)),
        excluded=unseen.excluded,
        note=UNBIASED_NOTE,
        synthetic=synthetic,
        created_at=datetime.now(UTC),
    )


def evaluate_field(run: Path, directories: Sequence[Path]) -> FieldEvaluation:
    """The run's TensorFlow model (threshold 0.5, as `evaluate`) on labelled field samples,
    written to RUN/eval-field/ (field.json, predictions.csv)."""
    from cellwatch.training.evaluate import predict
    from cellwatch.training.runinfo import load_run, load_run_split, write_json

    info = load_run(run)
    split = load_run_split(run, info)
    unseen = unseen_samples(load_field(directories), split.entries("train") + split.entries("val"))
    p_all = [float(p) for p in predict(run, info, unseen.entries, "evaluating (field)")[:, 1]]
    result = field_figures(
        unseen,
        p_all,
        EVAL_THRESHOLD,
        model=f"run {run.resolve()} ({info.checkpoint}, TensorFlow)",
        synthetic=info.synthetic,
    )
    with staged_dir(run / FIELD_EVAL_DIR, marker=FIELD_FILE, force=True, what="evaluation") as tmp:
        write_json(tmp / FIELD_FILE, result)
        write_predictions(tmp / "predictions.csv", unseen.rows, p_all)
    return result


def write_predictions(path: Path, rows: Sequence[SampleRow], p_all: Sequence[float]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "source", "reason", "label", "p_ALL", "p_ALL_node"])
        for r, p in zip(rows, p_all, strict=True):
            writer.writerow([r.id, r.source, r.reason.value, r.label, f"{p:.6f}", f"{r.p_all:.6f}"])


def measure_deployed(
    xml: Path, unseen: Unseen, threshold: float, precision: str, synthetic: bool
) -> FieldEvaluation:
    """The bundle's IR, run by OpenVINO at the CPU's default inference precision as the
    deployed figures are (export.py), on the unseen field samples at the bundle's threshold."""
    from cellwatch.training import ir
    from cellwatch.training.evaluate import batches
    from cellwatch.training.preprocess import Preprocessor

    compiled = ir.CompiledIR(xml, ir.DEVICE_DEFAULT)
    with Preprocessor() as pre:
        x = np.concatenate(list(batches(Path("/"), unseen.entries, pre, "field inputs")))
    p_all = [float(p) for p in compiled.predict(x)[:, 1]]
    return field_figures(
        unseen,
        p_all,
        threshold,
        model=f"deployed {precision} IR (OpenVINO CPU, {compiled.inference_precision})",
        synthetic=synthetic,
    )
