"""Shared, expensive training artefacts, built once per session with the real libraries.

Nothing here is downloaded: the "ImageNet" checkpoint is a 1001-class Inception V3
saved from the network itself (random weights, V1 single-file format, named like the
public `inception_v3.ckpt`) at the tests' depth multiplier (tests/training/sizes.py),
and the images are SYNTHETIC smears from `synth`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cellwatch.shared.signing import generate_keypair
from tests.training.sizes import TEST_BASE, TEST_DEPTH

if TYPE_CHECKING:
    from cellwatch.training.ir import Precision

TINY_COUNT = 40
"""Synthetic images for the shared tiny run: 28 train / 6 val / 6 test."""


def save_imagenet_like_checkpoint(
    path: Path, seed: int = 1, depth_multiplier: float = TEST_DEPTH
) -> Path:
    """A 1001-class TF-Slim Inception V3 checkpoint in the public file's V1 format."""
    from cellwatch.training.checkpoint import write_random_base

    return write_random_base(path, seed, depth_multiplier)


@pytest.fixture(scope="session")
def imagenet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`.../inception_v3.ckpt`: 1001 classes, 388 variables, the public file's names (at
    TEST_DEPTH, so narrower shapes)."""
    return save_imagenet_like_checkpoint(tmp_path_factory.mktemp("ckpt") / "inception_v3.ckpt")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cellwatch.training.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(out, TINY_COUNT, seed=11)
    return out


@pytest.fixture(scope="session")
def split_dir(synth_data: Path) -> Path:
    from cellwatch.training.split import prepare

    out = synth_data.parent / "split"
    prepare(synth_data, out, val=0.15, test=0.15, seed=3)
    return out


@pytest.fixture(scope="session")
def trained_run(split_dir: Path, imagenet_ckpt: Path) -> Path:
    """A bottleneck-mode run: 2 epochs from the 1001-class checkpoint."""
    from cellwatch.training.fit import fit
    from cellwatch.training.runinfo import FitConfig

    out = split_dir.parent / "run"
    config = FitConfig(epochs=2, batch_size=8, seed=5, depth_multiplier=TEST_DEPTH)
    fit(split_dir, out, config, base_checkpoint=imagenet_ckpt)
    return out


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    private, _ = generate_keypair(tmp_path_factory.mktemp("keys"), "train-test")
    return private


@pytest.fixture(scope="session")
def bundle(trained_run: Path, signing_key: Path) -> Callable[[Precision], Path]:
    """bundle(precision) -> the trained run exported at that precision (made on first use).

    Every precision is exported with allow_degraded: this 2-epoch model puts several
    images within a few thousandths of its threshold, so on CPUs that compute in bf16
    (a Xeon with AMX) even fp32 moves one decision of the 40 images the gate now
    measures (39/40 < 0.98), and plain int8 more; on an f32-only CPU fp32 passes. The
    tests check that whatever the gate decided is recorded truthfully. Every precision is exported
    with allow_no_skill: 2 epochs on 28 images show no evidence of skill on 6 test
    images (the ROC AUC interval reaches 0.5), so the quality floor refuses the run
    without it (tests/training/test_quality.py) and the bundle is flagged no-skill.
    """
    from cellwatch.training.export import ExportOptions, export

    made: dict[Precision, Path] = {}

    def get(precision: Precision) -> Path:
        if precision not in made:
            out = trained_run.parent / f"bundle-{precision}"
            export(
                trained_run,
                out,
                ExportOptions(
                    name="all-test",
                    version=f"0.0.1-{precision}",
                    precision=precision,
                    sign_key=signing_key,
                    calibration_size=16,
                    allow_degraded=True,
                    allow_no_skill=True,
                    base_is=TEST_BASE,
                ),
            )
            made[precision] = out
        return made[precision]

    return get
