"""Model selection and fine-tuning correctness: the kept epoch is the one with the lowest
validation loss, early stopping follows its rule, the learning rate follows its schedule,
fine-tuning changes only trainable scopes (batch-norm statistics included), dropout is on
while fine-tuning, and fine-tuning is deterministic for a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellwatch.training import network
from cellwatch.training.bottleneck import cache_key, library_versions
from cellwatch.training.errors import TrainingError
from cellwatch.training.fit import MIN_IMPROVEMENT, fit
from cellwatch.training.runinfo import FitConfig, load_run
from cellwatch.training.split import load_split
from tests.training.runs import is_head, read_ckpt
from tests.training.sizes import TEST_DEPTH

SCOPES = ["InceptionV3/Logits", "InceptionV3/Mixed_7c"]


def test_learning_rate_schedules() -> None:
    cosine = FitConfig(depth_multiplier=TEST_DEPTH, epochs=4, learning_rate=0.1)
    assert [round(cosine.learning_rate_at(e), 6) for e in (1, 2, 3, 4)] == [
        0.1,
        pytest.approx(0.085355, abs=1e-6),
        0.05,
        pytest.approx(0.014645, abs=1e-6),
    ]
    step = FitConfig(depth_multiplier=TEST_DEPTH, epochs=8, learning_rate=0.1, lr_schedule="step")
    assert [step.learning_rate_at(e) for e in (1, 4, 5, 6, 7, 8)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    assert (
        FitConfig(depth_multiplier=TEST_DEPTH, lr_schedule="constant").learning_rate_at(30) == 1e-3
    )


def test_cache_key_covers_the_software() -> None:
    libs = library_versions()
    assert set(libs) == {"tensorflow", "opencv-python-headless", "pillow", "numpy"}
    key = cache_key("d" * 64, libs)
    assert key == cache_key("d" * 64, dict(libs))
    assert cache_key("e" * 64, libs) != key
    for name in libs:
        assert cache_key("d" * 64, {**libs, name: "0.0.0"}) != key, name


def stops_at(val_losses: list[float], patience: int) -> int | None:
    """The epoch the patience rule stops after, or None."""
    best, since = float("inf"), 0
    for epoch, loss in enumerate(val_losses, start=1):
        if loss < best - MIN_IMPROVEMENT:
            best, since = loss, 0
        else:
            since += 1
        if patience and since >= patience:
            return epoch
    return None


@pytest.mark.slow
def test_the_epoch_with_the_lowest_validation_loss_is_kept(
    split_dir: Path, imagenet_ckpt: Path, trained_run: Path, tmp_path: Path
) -> None:
    config = FitConfig(
        depth_multiplier=TEST_DEPTH,
        epochs=30,
        batch_size=8,
        seed=5,
        patience=3,
        learning_rate=3e-4,
        lr_schedule="constant",
    )
    info = fit(split_dir, tmp_path / "run", config, base_checkpoint=imagenet_ckpt)
    losses = [h.val_loss for h in info.history]
    assert all(v is not None for v in losses)
    values = [float(v) for v in losses if v is not None]
    kept = int(np.argmin(values)) + 1
    assert info.selected_epoch == kept and info.selection is not None
    stop = stops_at(values, config.patience)
    assert len(info.history) == (stop if stop is not None else config.epochs)
    assert ("stopped early" in info.selection) is (stop is not None and stop < config.epochs)
    print(f"kept epoch {kept} of {len(values)}: {info.selection}; val losses {values}")
    # the checkpoint holds that epoch: its own validation loss is the one logged for it
    from cellwatch.training.evaluate import predict_logits

    val = load_split(split_dir).entries("val")
    logits = predict_logits(tmp_path / "run", load_run(tmp_path / "run"), val, "val").astype(
        np.float64
    )
    y = np.array([e.label for e in val])
    z = logits - logits.max(axis=1, keepdims=True)
    xent = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))
    assert xent == pytest.approx(values[kept - 1], rel=1e-3, abs=1e-4)
    assert info.checkpoint == f"model.ckpt-{info.history[kept - 1].steps}"


@pytest.mark.slow
def test_finetune_changes_only_trainable_scopes_deterministically(
    split_dir: Path, imagenet_ckpt: Path, tmp_path: Path
) -> None:
    config = FitConfig(
        depth_multiplier=TEST_DEPTH,
        mode="finetune",
        epochs=1,
        batch_size=7,
        seed=2,
        trainable_scopes=SCOPES,
        train_batch_norm=True,
    )
    a = fit(split_dir, tmp_path / "a", config, base_checkpoint=imagenet_ckpt)
    b = fit(split_dir, tmp_path / "b", config, base_checkpoint=imagenet_ckpt)
    saved_a = read_ckpt(tmp_path / "a" / a.checkpoint)
    saved_b = read_ckpt(tmp_path / "b" / b.checkpoint)
    base = read_ckpt(imagenet_ckpt)
    assert sorted(saved_a) == sorted(saved_b)
    for name in saved_a:  # the same seed gives the same network, bit for bit
        np.testing.assert_array_equal(saved_a[name], saved_b[name], err_msg=name)
    moving = [n for n in saved_a if "moving_" in n]
    in_7c = [n for n in moving if n.startswith("InceptionV3/Mixed_7c/")]
    assert in_7c and any(not np.array_equal(saved_a[n], base[n]) for n in in_7c)
    for name in moving:  # batch norm outside the trainable scopes did not learn anything
        if not name.startswith("InceptionV3/Mixed_7c/") and not is_head(name):
            np.testing.assert_array_equal(saved_a[name], base[name], err_msg=name)


@pytest.mark.slow
def test_finetune_runs_dropout_and_needs_the_head(split_dir: Path, imagenet_ckpt: Path) -> None:
    from cellwatch.training.trainer import FinetuneTrainer

    split = load_split(split_dir)
    trainer = FinetuneTrainer(
        FitConfig(depth_multiplier=TEST_DEPTH, mode="finetune", seed=3, trainable_scopes=SCOPES),
        split,
        imagenet_ckpt,
    )
    try:
        trainer.prepare(None)
        x = np.stack([trainer.pre.eval(trainer._rgb(e)) for e in trainer.train[:4]])
        y = np.array([e.label for e in trainer.train[:4]])
        feed = {trainer.train_images: x, trainer.labels: y}
        losses = {float(trainer.session.run(trainer.loss, feed)) for _ in range(3)}
        assert len(losses) > 1  # the training tower drops units: same input, other loss
        evals = {
            trainer.session.run(trainer.logits_for_eval, {trainer.images: x}).tobytes()
            for _ in range(3)
        }
        assert len(evals) == 1  # the eval tower does not
    finally:
        trainer.close()
    with pytest.raises(TrainingError, match="must include InceptionV3/Logits"):
        FinetuneTrainer(
            FitConfig(
                depth_multiplier=TEST_DEPTH,
                mode="finetune",
                trainable_scopes=["InceptionV3/Mixed_7c"],
            ),
            split,
            imagenet_ckpt,
        )
    assert network.covers(SCOPES, f"{network.HEAD_CONV_SCOPE}/weights")
