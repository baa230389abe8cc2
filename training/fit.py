"""`fit`: train the 2-class head (bottleneck) or chosen scopes (finetune) into a run directory.

Everything that can be checked cheaply (split, checkpoint path, output directory) is
checked before any TensorFlow work; the checkpoint is matched against the network
before anything is written; the run directory appears only when training finished.

Model selection: after every epoch the validation loss is computed; the epoch with
the lowest one is what the run keeps (its trainable state is held in memory and
restored before the checkpoint is written), and training stops early once
`patience` epochs in a row brought no improvement. run.json says which epoch was
kept and why (`selected_epoch`, `selection`). Without a validation split the last
epoch is kept. A cross-validation fold (`--fold i`) trains a fixed number of epochs
chosen beforehand (`--epochs`) and keeps the last: its validation split is the
held-out fold that scores it, which must not also choose its epoch (its loss is still
logged per epoch).
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cellwatch.training import LABELS, checkpoint
from cellwatch.training.errors import DataError, TrainingError
from cellwatch.training.outdir import check_target, staged_dir
from cellwatch.training.plots import training_curves
from cellwatch.training.progress import track
from cellwatch.training.runinfo import (
    CURVES_FILE,
    LOG_FILE,
    RUN_FILE,
    BaseCheckpoint,
    EpochLog,
    FitConfig,
    RunInfo,
    write_json,
)
from cellwatch.training.split import load_split
from cellwatch.training.tfcompat import versions
from cellwatch.training.trainer import BottleneckTrainer, FinetuneTrainer, Trainer

log = logging.getLogger(__name__)

MIN_IMPROVEMENT = 1e-4
"""A validation loss must fall by more than this to count as better."""
BOTTLENECK_CACHE_DIR = "bottlenecks"
"""Default cache location: inside the split directory (shared by every run of that split)."""


def fit(
    split_dir: Path,
    out: Path,
    config: FitConfig,
    *,
    base_checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> RunInfo:
    """Train as config says and write the run directory out; returns its RunInfo."""
    split = load_split(split_dir).for_fold(config.fold)
    if not split.entries("train"):
        raise DataError(f"the training split of {split_dir} is empty")
    if config.mode == "bottleneck" and config.trainable_scopes != FitConfig().trainable_scopes:
        raise TrainingError(
            "--trainable-scopes applies to --mode finetune; bottleneck mode "
            "trains InceptionV3/Logits on cached features"
        )
    prefix = checkpoint.resolve(base_checkpoint) if base_checkpoint is not None else None
    check_target(out, marker=RUN_FILE, force=force, what="training run")
    base = None
    if prefix is not None:
        log.info("hashing base checkpoint %s", prefix)
        base = BaseCheckpoint(path=str(prefix.resolve()), sha256=checkpoint.sha256(prefix))
    cache_root = None
    if config.mode == "bottleneck":
        cache_root = (cache_dir or split_dir / BOTTLENECK_CACHE_DIR).resolve()
    if split.synthetic:
        log.warning("training on SYNTHETIC data (%s)", split.data_root)

    trainer: Trainer = (BottleneckTrainer if config.mode == "bottleneck" else FinetuneTrainer)(
        config, split, prefix
    )
    try:
        trainer.prepare(cache_root)
        with staged_dir(out, marker=RUN_FILE, force=force, what="training run") as tmp:
            history, chosen = _train(trainer, config, tmp)
            final = trainer.save(tmp, chosen.steps)
            _write_log(history, tmp / LOG_FILE)
            training_curves(
                history, tmp / CURVES_FILE, synthetic=split.synthetic, selected=chosen.epoch
            )
            info = RunInfo(
                created_at=datetime.now(UTC),
                config=config,
                split_dir=str(split_dir.resolve()),
                data_root=split.data_root,
                fingerprints=split.fingerprints,
                synthetic=split.synthetic,
                labels=list(LABELS),
                base_checkpoint=base,
                base_weights_sha256=trainer.base_digest,
                checkpoint=final,
                steps=trainer.steps,
                history=history,
                selected_epoch=chosen.epoch,
                selection=chosen.reason,
                skipped_images=len(split.skipped),
                bottleneck_cache=str(cache_root) if cache_root else None,
                versions=versions(),
            )
            write_json(tmp / RUN_FILE, info)
    finally:
        trainer.close()
    log.info("run %s: %d steps; kept epoch %d (%s)", out, info.steps, chosen.epoch, chosen.reason)
    return info


@dataclass(frozen=True)
class Chosen:
    epoch: int
    steps: int
    reason: str


def _train(trainer: Trainer, config: FitConfig, directory: Path) -> tuple[list[EpochLog], Chosen]:
    """Run the epochs; restore the best one's state and say which it is."""
    history: list[EpochLog] = []
    best: tuple[float, int, int, list[np.ndarray]] | None = None  # loss, epoch, steps, state
    since_best = 0
    stopped = ""
    epochs = range(1, config.epochs + 1)
    for epoch in track(epochs, f"training ({config.mode})"):
        start = time.perf_counter()
        loss, acc = trainer.train_epoch(epoch)
        val = trainer.validate()
        if val is not None and config.fold is None:
            if best is None or val[0] < best[0] - MIN_IMPROVEMENT:
                best = (val[0], epoch, trainer.steps, trainer.snapshot())
                since_best = 0
            else:
                since_best += 1
        history.append(
            EpochLog(
                epoch=epoch,
                steps=trainer.steps,
                train_loss=loss,
                train_accuracy=acc,
                val_loss=None if val is None else val[0],
                val_accuracy=None if val is None else val[1],
                seconds=time.perf_counter() - start,
            )
        )
        log.debug("epoch %d: loss %.4f acc %.3f val %s", epoch, loss, acc, val)
        if config.mode == "finetune" or epoch == config.epochs:
            log.info(
                "epoch %d/%d: loss %.4f, accuracy %.3f%s",
                epoch,
                config.epochs,
                loss,
                acc,
                "" if val is None else f", val loss {val[0]:.4f}, val accuracy {val[1]:.3f}",
            )
        every = config.checkpoint_every
        if every and epoch % every == 0 and epoch < config.epochs:
            trainer.save(directory)
        early = config.patience and config.fold is None
        if early and since_best >= config.patience and epoch < config.epochs:
            stopped = (
                f"; stopped early after epoch {epoch}: no lower validation loss for "
                f"{config.patience} epochs"
            )
            log.info("early stop at epoch %d (best epoch %d)", epoch, best[1] if best else 0)
            break
    if best is None:
        last = history[-1]
        if config.fold is not None:
            reason = (
                f"fixed {config.epochs} epochs chosen beforehand (cross-validation: the "
                f"held-out fold {config.fold} only scores the model, it never chooses the epoch)"
            )
            return history, Chosen(last.epoch, last.steps, reason)
        return history, Chosen(last.epoch, last.steps, "last epoch (no validation split)")
    val_loss, epoch, steps, state = best
    trainer.restore(state)
    reason = (
        f"lowest validation loss {val_loss:.4f} at epoch {epoch} of {len(history)} run{stopped}"
    )
    return history, Chosen(epoch, steps, reason)


def _write_log(history: list[EpochLog], path: Path) -> None:
    fields = list(EpochLog.model_fields)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow(row.model_dump())
