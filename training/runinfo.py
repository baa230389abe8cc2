"""A training run directory and its run.json (what `fit` did, for `evaluate` and `export`).

Layout of RUN/:
    run.json              RunInfo below
    model.ckpt-<step>.*   checkpoints of the whole 2-class network (TF1 Saver, V2 format)
    training_log.csv      one row per epoch
    curves.png            loss and accuracy per epoch
    eval-<split>/         metrics.json, confusion.png, roc.png (`evaluate`)
    calibration/          calibration.json, reliability.png (`export`)
    frozen.pb             the frozen eval graph (`export`)

A run is tied to its split: run.json keeps the split's fingerprints, and `evaluate`
and `export` refuse a split that changed since (`load_run_split`). Every read of the
test split is recorded in run.json (`test_reads`), so a figure can be read with the
number of looks behind it.
"""

from __future__ import annotations

import math
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from cellwatch.shared.base import Strict
from cellwatch.training.errors import RunError
from cellwatch.training.split import SplitFile, load_split, verify_files
from cellwatch.training.stratify import SplitName

RUN_FILE = "run.json"
LOG_FILE = "training_log.csv"
CURVES_FILE = "curves.png"
FROZEN_FILE = "frozen.pb"
Mode = Literal["bottleneck", "finetune"]
LrSchedule = Literal["cosine", "step", "constant"]
RANDOM_INIT = "random-init"


class FitConfig(Strict):
    """How to train (the `fit` options)."""

    mode: Mode = "bottleneck"
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(16, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    seed: int = Field(0, ge=0, lt=2**31)
    trainable_scopes: list[str] = Field(
        default_factory=lambda: ["InceptionV3/Logits", "InceptionV3/AuxLogits"],
        description="finetune: variable scopes to train (TF-Slim's --trainable_scopes)",
    )
    train_batch_norm: bool = Field(
        False,
        description="finetune: run batch norm in training mode (batch statistics, moving "
        "averages updated, dropout on) as TF-Slim's train_image_classifier did; default "
        "keeps it in inference mode, which suits small batches",
    )
    checkpoint_every: int = Field(
        0, ge=0, description="also save every N epochs (0: only the final checkpoint)"
    )
    patience: int = Field(
        10,
        ge=0,
        description="stop after this many epochs without a lower validation loss (0: never)",
    )
    lr_schedule: LrSchedule = Field(
        "cosine",
        description="cosine: decays to 0 over the epochs; step: /10 at 50% and 75%; constant",
    )
    fold: int | None = Field(None, ge=0, description="cross-validation fold trained (--fold)")
    depth_multiplier: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="TF-Slim's Inception V3 depth multiplier: 1.0 is the published network "
        "(and its ImageNet checkpoint); smaller is the same network narrower, for tests",
    )

    def learning_rate_at(self, epoch: int) -> float:
        """The rate for epoch (1-based) under lr_schedule."""
        done = (epoch - 1) / self.epochs
        if self.lr_schedule == "cosine":
            return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * done))
        if self.lr_schedule == "step":
            return (
                self.learning_rate * (0.1 if done >= 0.5 else 1.0) * (0.1 if done >= 0.75 else 1.0)
            )
        return self.learning_rate


class BaseCheckpoint(Strict):
    path: str
    sha256: str


class EpochLog(Strict):
    epoch: int = Field(ge=1)
    steps: int = Field(ge=0)
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float = Field(ge=0)


class SplitRead(Strict):
    """One look at the test split (`evaluate --split test`, `export`)."""

    at: datetime
    command: str
    n: int = Field(ge=0)


class RunInfo(Strict):
    """run.json."""

    schema_: Literal["cellwatch.run/1"] = Field("cellwatch.run/1", alias="schema")
    created_at: datetime
    config: FitConfig
    split_dir: str
    data_root: str
    fingerprints: dict[str, str] = Field(description="the split's fingerprints (per split, all)")
    synthetic: bool
    labels: list[str]
    base_checkpoint: BaseCheckpoint | None = Field(description="null: random initialisation")
    base_weights_sha256: str = Field(description="digest of the base network's restored weights")
    checkpoint: str = Field(
        description="exported checkpoint prefix (the selected epoch), relative to the run"
    )
    steps: int = Field(ge=0, description="training steps run (all epochs)")
    history: list[EpochLog]
    selected_epoch: int | None = Field(None, ge=1, description="the epoch `checkpoint` holds")
    selection: str | None = Field(None, description="why that epoch (model selection)")
    test_reads: list[SplitRead] = Field(
        default_factory=list, description="every read of the test split, in order"
    )
    skipped_images: int = Field(0, ge=0)
    bottleneck_cache: str | None = None
    versions: dict[str, str]

    @property
    def base_provenance(self) -> dict[str, str]:
        if self.base_checkpoint is None:
            return {"path": RANDOM_INIT, "sha256": RANDOM_INIT}
        return self.base_checkpoint.model_dump()


def load_run(run: Path) -> RunInfo:
    """Read RUN/run.json; RunError if the run is missing or incomplete."""
    path = run / RUN_FILE
    if not path.is_file():
        raise RunError(f"{run} is not a training run (no {RUN_FILE}); run `cellwatch-train fit`")
    try:
        info = RunInfo.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise RunError(f"{path} is not a valid run file: {exc.errors()[0]['msg']}") from exc
    if not Path(f"{run / info.checkpoint}.index").is_file():
        raise RunError(f"run {run} lacks its checkpoint {info.checkpoint}")
    return info


def load_run_split(run: Path, info: RunInfo) -> SplitFile:
    """The split the run was trained on (its fold's view); RunError if it changed since fit.

    The fingerprints compared are recomputed from split.json's entries (load_split) and
    every image is hashed again (verify_files): neither split.json's own fingerprints
    nor its hashes are taken on trust."""
    split = load_split(Path(info.split_dir)).for_fold(info.config.fold)
    verify_files(split)
    changed = [
        name
        for name in ("train", "val", "test")
        if split.fingerprints.get(name) != info.fingerprints.get(name)
    ]
    if changed:
        name = changed[0]
        raise RunError(
            f"the split in {info.split_dir} changed after `fit` of {run} ({', '.join(changed)} "
            f"fingerprint {info.fingerprints.get(name, '?')[:12]} -> "
            f"{split.fingerprints.get(name, '?')[:12]}): it may hold images this run trained "
            "on; train again on this split"
        )
    return split


def record_test_read(run: Path, command: str, split: SplitName, n: int) -> RunInfo:
    """Count a read of the test split in run.json (other splits are not counted)."""
    info = load_run(run)
    if split != "test":
        return info
    read = SplitRead(at=datetime.now(UTC), command=command, n=n)
    info = info.model_copy(update={"test_reads": [*info.test_reads, read]})
    write_json(run / RUN_FILE, info)
    return info


def write_json(path: Path, model: BaseModel) -> None:
    """Write a pydantic model as JSON via a temporary file (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(model.model_dump_json(by_alias=True, indent=2) + "\n")
    tmp.replace(path)


def code_commit() -> str | None:
    """The git commit of the code (`+dirty` when a tracked Python file differs from it),
    or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", ":/*.py"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None
