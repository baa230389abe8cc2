"""A training run directory and its run.json (what `fit` did, for `evaluate` and `export`).

Layout of RUN/:
    run.json              RunInfo below
    model.ckpt-<step>.*   checkpoints of the whole 2-class network (TF1 Saver, V2 format)
    training_log.csv      one row per epoch
    curves.png            loss and accuracy per epoch
    eval-<split>/         metrics.json, confusion.png, roc.png (`evaluate`)
    frozen.pb             the frozen eval graph (`export`)
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellwatch.training.errors import RunError

RUN_FILE = "run.json"
LOG_FILE = "training_log.csv"
CURVES_FILE = "curves.png"
FROZEN_FILE = "frozen.pb"
Mode = Literal["bottleneck", "finetune"]
RANDOM_INIT = "random-init"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FitConfig(_Model):
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


class BaseCheckpoint(_Model):
    path: str
    sha256: str


class EpochLog(_Model):
    epoch: int = Field(ge=1)
    steps: int = Field(ge=0)
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float = Field(ge=0)


class RunInfo(_Model):
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
    checkpoint: str = Field(description="final checkpoint prefix, relative to the run directory")
    steps: int = Field(ge=0)
    history: list[EpochLog]
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


def write_json(path: Path, model: BaseModel) -> None:
    """Write a pydantic model as JSON via a temporary file (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(model.model_dump_json(by_alias=True, indent=2) + "\n")
    tmp.replace(path)
