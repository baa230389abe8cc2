"""The labelled field directory: what `cellwatch-hub samples export DIR` writes, a labeller
fills in, and `cellwatch-train prepare/evaluate --field DIR` reads (issue 20).

    DIR/
      samples.csv          one row per sample (COLUMNS), UTF-8, a header row first
      <id>.png             each sample's pixels, lossless PNG without metadata

- **id** is the SHA-256 (hex) of the PNG file's bytes, and the file is `<id>.png`. The
  node encodes a sample once and nothing rewrites it, so the hash of the file is its
  identity on the node, on the hub (content-addressed: the same file twice is one
  sample) and here; `read_samples` checks every file's hash against its id, so a file
  edited or swapped after export is reported. (Pixel-identical copies encoded to other
  bytes are distinct ids; training's near-duplicate merge still puts them in one group.)
- **source** is the `{source}` the image came from (the lab or microscope, whose consent
  allowed the collection); **node** the node that kept it; **model** `name@version` of
  the model whose Result it carries; **p_all** that Result's p(ALL); **predicted** its
  label; **reason** why it was kept (`SampleReason`); **collected_at** ISO 8601 with a
  time zone.
- **label** is empty in an export and filled in by the labeller with a class name of
  the bundle's labels (`normal` or `ALL`, exactly). Nothing is guessed: an unknown
  label, a missing one (where labels are required), a repeated id, a row without its
  image and an image without a row are each reported with the line they are on, all
  of them at once (`SampleError.problems`), and the directory is not used.
- Columns may come in any order; other columns (a labeller's notes) are ignored.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints, ValidationError, field_validator

from cellwatch.shared.base import Strict, problem
from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.schemas import Name, Probability, Sha256

SAMPLES_CSV = "samples.csv"
"""The table of a field directory."""
SAMPLE_SUFFIX = ".png"
"""Every sample is a lossless PNG named `<id>.png`."""
COLUMNS = (
    "id",
    "source",
    "node",
    "model",
    "p_all",
    "predicted",
    "reason",
    "collected_at",
    "label",
)
"""samples.csv's columns, in the order an export writes them."""
MAX_SHOWN = 3
"""Problems named in a SampleError's one-line message (all are in `.problems`)."""

ModelAtVersion = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}@[A-Za-z0-9_.+-]{1,64}$")
]
"""`name@version` of a model (shared.schemas ModelName and Version joined by `@`)."""


class SampleReason(StrEnum):
    """Why a node kept a sample. Only `random` is an unbiased sample of what the fleet
    sees; the other two are chosen because the model found them hard."""

    LOW_CONFIDENCE = "low_confidence"
    DISAGREEMENT = "disagreement"
    RANDOM = "random"


UNBIASED_REASON = SampleReason.RANDOM
UNBIASED_NOTE = (
    "only `random` samples give an unbiased estimate of field accuracy; "
    "`low_confidence` and `disagreement` samples were kept because the model found them "
    "hard, so their figures show where it is weak, not how it does in the field"
)


class SampleError(CellwatchError):
    """A field directory or its samples.csv is unusable; `problems` lists every one
    (`samples.csv:LINE: what`), the message names the first few on one line."""

    def __init__(self, where: Path, problems: Sequence[str]) -> None:
        self.where = where
        self.problems = list(problems)
        shown = "; ".join(self.problems[:MAX_SHOWN])
        more = len(self.problems) - MAX_SHOWN
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        tail = f"; and {more} more" if more > 0 else ""
        super().__init__(f"{where}: {count}: {shown}{tail}")


class SampleRow(Strict):
    """One row of samples.csv (label None: not labelled yet)."""

    id: Sha256 = Field(description="SHA-256 of the PNG file's bytes; the file is <id>.png")
    source: Name = Field(description="the {source} the image came from")
    node: Name = Field(description="the node that kept it")
    model: ModelAtVersion = Field(description="name@version of the model that answered")
    p_all: Probability = Field(description="that Result's p(ALL)")
    predicted: str = Field(min_length=1, description="that Result's label")
    reason: SampleReason
    collected_at: AwareDatetime
    label: str | None = Field(None, description="the labeller's class name; None: unlabelled")

    @field_validator("label", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def file_name(self) -> str:
        return sample_file_name(self.id)


@dataclass(frozen=True)
class SampleSet:
    """The rows of a field directory that passed every check, with their line numbers."""

    directory: Path
    rows: list[SampleRow]
    lines: dict[str, int]
    """id -> line of samples.csv"""

    def path(self, row: SampleRow) -> Path:
        return self.directory / row.file_name


def sample_id(data: bytes) -> str:
    """A sample's id: the SHA-256 of its PNG file's bytes."""
    return hashlib.sha256(data).hexdigest()


def sample_file_name(sample: str) -> str:
    return f"{sample}{SAMPLE_SUFFIX}"


def write_samples_csv(path: Path, rows: Iterable[SampleRow]) -> None:
    """samples.csv with COLUMNS in order (an empty label for an unlabelled row)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(
            [
                r.id,
                r.source,
                r.node,
                r.model,
                repr(r.p_all),
                r.predicted,
                r.reason.value,
                r.collected_at.isoformat(),
                r.label or "",
            ]
        )
    path.write_text(out.getvalue(), encoding="utf-8")


def read_samples(
    directory: Path, labels: Sequence[str], *, require_labels: bool = True
) -> SampleSet:
    """Read and check a field directory: SampleError listing every problem, or the rows.

    labels: the class names a label (and `predicted`) must be one of, e.g. training's
    LABELS or a bundle's `labels`. require_labels: an empty label is a problem (training
    and evaluation); without it (an export being checked) it is allowed.
    """
    if not directory.is_dir():
        raise SampleError(directory, ["not a directory (a field directory from `samples export`)"])
    table = directory / SAMPLES_CSV
    try:
        text = table.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SampleError(directory, [f"no {SAMPLES_CSV}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(table, [f"cannot read: {exc}"]) from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or not any(h.strip() for h in header):
        raise SampleError(table, ["empty (expected a header row: " + ",".join(COLUMNS) + ")"])
    names = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise SampleError(table, [f"line 1: missing column(s) {', '.join(missing)}"])
    index = {c: names.index(c) for c in COLUMNS}
    problems: list[str] = []
    rows: list[SampleRow] = []
    lines: dict[str, int] = {}
    known = ", ".join(labels)
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        values = {c: cells[i].strip() if i < len(cells) else "" for c, i in index.items()}
        try:
            row = SampleRow.model_validate(values)
        except ValidationError as exc:
            problems += [f"line {line}: {problem(e)}" for e in exc.errors()]
            continue
        row_problems = []
        if row.predicted not in labels:
            row_problems.append(f"line {line}: unknown predicted label {row.predicted!r}")
        if row.label is None:
            if require_labels:
                row_problems.append(f"line {line}: no label (label it {' or '.join(labels)})")
        elif row.label not in labels:
            row_problems.append(f"line {line}: unknown label {row.label!r} (known: {known})")
        if row.id in lines:
            row_problems.append(f"line {line}: id {row.id[:12]}... repeats line {lines[row.id]}")
        else:
            lines[row.id] = line
            row_problems += _file_problems(directory, row, line)
        problems += row_problems
        if not row_problems:
            rows.append(row)
    if not lines and not problems:
        problems.append("no rows (only a header)")
    listed = {sample_file_name(i) for i in lines}
    for extra in sorted(p.name for p in directory.glob(f"*{SAMPLE_SUFFIX}")):
        if extra not in listed:
            problems.append(f"{extra}: image without a row")
    if problems:
        raise SampleError(table, problems)
    return SampleSet(directory, rows, lines)


def _file_problems(directory: Path, row: SampleRow, line: int) -> list[str]:
    path = directory / row.file_name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [f"line {line}: no image file {row.file_name}"]
    except OSError as exc:
        return [f"line {line}: cannot read {row.file_name}: {exc.strerror}"]
    if sample_id(data) != row.id:
        return [f"line {line}: {row.file_name} is not the exported file (its SHA-256 differs)"]
    return []


__all__ = [
    "COLUMNS",
    "SAMPLES_CSV",
    "SAMPLE_SUFFIX",
    "UNBIASED_NOTE",
    "UNBIASED_REASON",
    "SampleError",
    "SampleReason",
    "SampleRow",
    "SampleSet",
    "read_samples",
    "sample_file_name",
    "sample_id",
    "write_samples_csv",
]
