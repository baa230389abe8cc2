"""The facts of one demo run, typed: written to WORKDIR/summary.json at the end (the
tests read it) and read by attribute everywhere in the demo."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cellwatch.shared.figures import Proportion


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counts(Model):
    """What the lab client got for the images it sent."""

    sent: int = 0
    answered: int = 0
    """Images with a Result (ok or error)."""
    failed: int = 0
    """Images with an error Result, or without a Result."""
    missing: int = 0
    """Images with no answer at all."""
    by_version: dict[str, int] = Field(default_factory=dict)
    by_node: dict[str, int] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)
    """The first few failures, one line each."""


class Classified(Counts):
    """Step 5: the held-out test images, each sent once."""

    accuracy: float = 0.0
    latency_ms_median: float = 0.0


class Swap(Counts):
    """Step 7b: images flowing while version 2 rolls out. Times are seconds relative to
    `rollout start`."""

    rate_per_s: float
    answered_during_rollout: int
    traffic_started_s: float
    traffic_stopped_s: float
    all_nodes_switched_s: float
    first_v2_answer_s: float | None
    last_v1_answer_s: float | None
    last_answer_version: str | None
    flowing_during_rollout: bool


class FieldFigures(Model):
    """One version's figures on one reason's held-out field samples (`evaluate --field`:
    the run's TensorFlow model; None: no sample of that reason)."""

    n: int
    accuracy: Proportion | None
    sensitivity: Proportion | None
    specificity: Proportion | None


class FieldVersion(Model):
    """`cellwatch-train evaluate RUN --field HELD_OUT` of one version."""

    version: str
    per_reason: dict[str, FieldFigures]
    """`random`, `low_confidence`, `disagreement` and `all`."""
    excluded: int
    """Held-out samples left out as (near-)copies of the run's training images."""


class FieldLoop(Model):
    """Step 6 and 7a: a batch from the field, its samples at the hub, labelled, split
    into a training half (for v2) and a held-out half (both versions measured on it)."""

    sent: int
    answered: int
    samples_at_hub: int
    """Every sample the hub held when the nodes had uploaded theirs."""
    field_samples: int
    """Of them, images of the field batch (the others: step 5's test images)."""
    by_reason: dict[str, int]
    """The field batch's samples per reason."""
    wait_s: float
    """From the last answer until both nodes reported their spools empty."""
    imported: int
    """Labels `cellwatch-hub samples import` recorded."""
    train: int
    held_out: int
    held_out_by_reason: dict[str, int]
    v2_split: dict[str, int] = Field(default_factory=dict)
    """Where `prepare --field` put the training half: split name -> samples."""
    evaluation: dict[str, FieldVersion] = Field(default_factory=dict)
    """`v1`, `v2` -> figures on the held-out half."""


class TrainedInfo(Model):
    version: str
    precision: str
    fallback: str | None
    """Why another precision than the profile's was shipped, if one was."""
    flags: list[str]
    metrics: dict[str, Any]
    """The bundle manifest's `metrics`, as written by `cellwatch-train export`."""


class ProcessRecord(Model):
    name: str
    pid: int
    ticks: int


class Paths(Model):
    plots: list[str] = Field(default_factory=list)
    metrics: list[str] = Field(default_factory=list)
    bundles: list[str] = Field(default_factory=list)
    model_cards: list[str] = Field(default_factory=list)
    logs: list[str] = Field(default_factory=list)


class Summary(Model):
    ok: bool = False
    error: str | None = None
    quick: bool
    workdir: str
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    nodes: list[str]
    model: str
    checkpoint: str | None
    int8: str
    """How v1's int8 was made: `ptq` (plain) or `accurate` (NNCF accuracy-aware if
    plain misses the gate)."""
    fleet_url: str | None = None
    rollout_v1_s: float | None = None
    trained: dict[str, TrainedInfo] = Field(default_factory=dict)
    classify: Classified | None = None
    field: FieldLoop | None = None
    swap: Swap | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    phases_s: dict[str, float] = Field(default_factory=dict)
    total_s: float = 0.0
    exit_codes: dict[str, int | None] = Field(default_factory=dict)
    processes: list[ProcessRecord] = Field(default_factory=list)
    nodes_answered: list[str] = Field(default_factory=list)
    versions_seen: list[str] = Field(default_factory=list)
    paths: Paths = Field(default_factory=Paths)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"
