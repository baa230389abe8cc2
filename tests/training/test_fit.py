"""`fit`: restoring really restores, bottleneck mode trains only the head (from a cache
keyed by image and base weights), finetune trains only the chosen scopes, and a run
directory appears only whole."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cellwatch.training import checkpoint, network
from cellwatch.training.bottleneck import BottleneckCache, FeatureExtractor
from cellwatch.training.errors import CheckpointError, TrainingError
from cellwatch.training.fit import BOTTLENECK_CACHE_DIR, fit
from cellwatch.training.runinfo import LOG_FILE, RUN_FILE, FitConfig, RunInfo
from cellwatch.training.split import load_split
from cellwatch.training.trainer import BottleneckTrainer
from tests.training.runs import is_head, read_ckpt
from tests.training.sizes import TEST_DEPTH

pytestmark = pytest.mark.slow

HEAD_W = f"{network.HEAD_CONV_SCOPE}/weights"
HEAD_B = f"{network.HEAD_CONV_SCOPE}/biases"


def test_bottleneck_base_is_restored_and_frozen_head_trains(
    split_dir: Path, imagenet_ckpt: Path, trained_run: Path
) -> None:
    base = read_ckpt(imagenet_ckpt)
    trainer = BottleneckTrainer(
        FitConfig(depth_multiplier=TEST_DEPTH, epochs=1, batch_size=8, seed=5),
        load_split(split_dir),
        imagenet_ckpt,
    )
    try:
        names = [network.variable_name(v) for v in trainer.base_vars]
        restored = dict(zip(names, trainer.session.run(trainer.base_vars), strict=True))
        assert len(restored) == 376
        for name, value in restored.items():
            np.testing.assert_array_equal(value, base[name], err_msg=name)
        head_vars = network.in_scopes(trainer.model_vars, [network.HEAD_CONV_SCOPE])
        head_before = trainer.session.run(head_vars)

        trainer.prepare(split_dir / BOTTLENECK_CACHE_DIR)
        assert trainer.cache is not None and trainer.cache.misses == 0  # warm from trained_run
        for epoch in (1, 2, 3):
            trainer.train_epoch(epoch)
        trainer.fold_head()
        head_after = trainer.session.run(head_vars)
        assert not np.allclose(head_before[0], head_after[0])
        for var, value in zip(
            trainer.base_vars, trainer.session.run(trainer.base_vars), strict=True
        ):
            np.testing.assert_array_equal(value, base[network.variable_name(var)])

        # folding is exact: the network's own 1x1 conv reproduces the standardised head
        x = trainer.val_x
        folded = x @ head_after[0].reshape(network.bottleneck_dim(TEST_DEPTH), 2) + head_after[1]
        trained = trainer.session.run(trainer.logits_for_eval, {trainer.features: x})
        np.testing.assert_allclose(folded, trained, rtol=1e-4, atol=1e-4)
    finally:
        trainer.close()

    saved = read_ckpt(
        trained_run / RunInfo.model_validate_json((trained_run / RUN_FILE).read_bytes()).checkpoint
    )
    for name, value in saved.items():
        if not is_head(name):
            np.testing.assert_array_equal(value, base[name], err_msg=name)
    assert saved[HEAD_W].shape == (1, 1, network.bottleneck_dim(TEST_DEPTH), 2)


def test_run_directory_contents(trained_run: Path, imagenet_ckpt: Path, split_dir: Path) -> None:
    info = RunInfo.model_validate_json((trained_run / RUN_FILE).read_bytes())
    assert info.synthetic and info.config.mode == "bottleneck"
    assert info.base_checkpoint is not None
    assert info.base_checkpoint.sha256 == checkpoint.sha256(imagenet_ckpt)
    assert info.steps == 2 * 4  # 28 training images in batches of 8, 2 epochs
    assert info.fingerprints == load_split(split_dir).fingerprints
    rows = list(csv.DictReader((trained_run / LOG_FILE).open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert (trained_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert Path(f"{trained_run / info.checkpoint}.index").is_file()


def test_cache_is_reused_and_matches_a_fresh_forward_pass(
    split_dir: Path, imagenet_ckpt: Path, trained_run: Path, tmp_path: Path
) -> None:
    info = RunInfo.model_validate_json((trained_run / RUN_FILE).read_bytes())
    cache_root = Path(info.bottleneck_cache or "")
    cached = list(cache_root.rglob("*.npy"))
    assert len(cached) == 34  # train + val; the test split is never touched by fit
    split = load_split(split_dir)
    trainer = BottleneckTrainer(
        FitConfig(depth_multiplier=TEST_DEPTH, seed=5), split, imagenet_ckpt
    )
    try:
        cache = BottleneckCache(cache_root, trainer.base_digest, network.bottleneck_dim(TEST_DEPTH))
        entries = split.entries("val")[:3]
        extractor = FeatureExtractor(
            trainer.session, trainer.images, trainer.net.prelogits, split.root
        )
        fresh = extractor.compute(entries)
        extractor.close()
        for entry, value in zip(entries, fresh, strict=True):
            hit = cache.get(entry.sha256)
            assert hit is not None
            np.testing.assert_allclose(hit, value, rtol=1e-5, atol=1e-6)
    finally:
        trainer.close()
    # another base network gets its own cache entries
    assert BottleneckCache(cache_root, "0" * 64).dir != cache.dir


def test_same_seed_same_model(
    split_dir: Path, imagenet_ckpt: Path, trained_run: Path, tmp_path: Path
) -> None:
    info = fit(
        split_dir,
        tmp_path / "again",
        FitConfig(depth_multiplier=TEST_DEPTH, epochs=2, batch_size=8, seed=5),
        base_checkpoint=imagenet_ckpt,
    )
    first = RunInfo.model_validate_json((trained_run / RUN_FILE).read_bytes())
    a = read_ckpt(trained_run / first.checkpoint)
    b = read_ckpt(tmp_path / "again" / info.checkpoint)
    np.testing.assert_array_equal(a[HEAD_W], b[HEAD_W])
    assert [h.train_loss for h in info.history] == [h.train_loss for h in first.history]


def test_finetune_trains_only_the_chosen_scopes(
    split_dir: Path, imagenet_ckpt: Path, tmp_path: Path
) -> None:
    config = FitConfig(
        depth_multiplier=TEST_DEPTH,
        mode="finetune",
        epochs=1,
        batch_size=7,
        seed=2,
        trainable_scopes=["InceptionV3/Logits", "InceptionV3/Mixed_7c"],
    )
    info = fit(split_dir, tmp_path / "ft", config, base_checkpoint=imagenet_ckpt)
    assert info.steps == 4 and info.history[0].val_accuracy is not None
    base, saved = read_ckpt(imagenet_ckpt), read_ckpt(tmp_path / "ft" / info.checkpoint)
    mixed_7c = [n for n in saved if n.startswith("InceptionV3/Mixed_7c/") and n.endswith("weights")]
    assert mixed_7c and all(not np.array_equal(saved[n], base[n]) for n in mixed_7c)
    for name in saved:  # frozen scopes, batch-norm statistics included, are untouched
        if not is_head(name) and not name.startswith("InceptionV3/Mixed_7c/"):
            np.testing.assert_array_equal(saved[name], base[name], err_msg=name)
        if name.startswith("InceptionV3/Mixed_7c/") and "moving_" in name:
            np.testing.assert_array_equal(saved[name], base[name], err_msg=name)


def test_bad_checkpoints_and_options_write_nothing(split_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="does not exist"):
        fit(
            split_dir,
            out,
            FitConfig(depth_multiplier=TEST_DEPTH),
            base_checkpoint=tmp_path / "inception_v3.ckpt",
        )
    junk = tmp_path / "inception_v3.ckpt"
    junk.write_bytes(json.dumps({"not": "a checkpoint"}).encode())
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        fit(split_dir, out, FitConfig(depth_multiplier=TEST_DEPTH, epochs=1), base_checkpoint=junk)
    with pytest.raises(TrainingError, match="applies to --mode finetune"):
        fit(
            split_dir,
            out,
            FitConfig(depth_multiplier=TEST_DEPTH, trainable_scopes=["InceptionV3/Mixed_7c"]),
        )
    with pytest.raises(TrainingError, match="match no variable"):
        fit(
            split_dir,
            out,
            FitConfig(depth_multiplier=TEST_DEPTH, mode="finetune", trainable_scopes=["Mixed_7c"]),
        )
    assert not out.exists() and not list(tmp_path.glob(".run.*"))


def test_existing_run_needs_force(split_dir: Path, trained_run: Path) -> None:
    with pytest.raises(TrainingError, match="already exists"):
        fit(split_dir, trained_run, FitConfig(depth_multiplier=TEST_DEPTH, epochs=1))
