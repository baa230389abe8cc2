"""Cross-validation folds through fit and evaluate, and a split without test images."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellwatch.training.errors import DataError, ExportError, RunError
from cellwatch.training.evaluate import cross_validate
from cellwatch.training.export import ExportOptions, export
from cellwatch.training.fit import BOTTLENECK_CACHE_DIR, fit
from cellwatch.training.runinfo import FitConfig
from cellwatch.training.split import prepare
from tests.training.helpers import train
from tests.training.sizes import TEST_BASE, TEST_DEPTH

pytestmark = pytest.mark.slow


def test_folds_are_trained_and_summarised(
    synth_data: Path, split_dir: Path, imagenet_ckpt: Path, tmp_path: Path
) -> None:
    folds = prepare(synth_data, tmp_path / "split", val=0.0, test=0.15, seed=3, folds=2)
    cache = split_dir / BOTTLENECK_CACHE_DIR  # same images, same base: reuse the features
    with pytest.raises(DataError, match="pass --fold"):
        fit(
            tmp_path / "split",
            tmp_path / "nofold",
            FitConfig(depth_multiplier=TEST_DEPTH, epochs=1),
            cache_dir=cache,
        )
    runs = []
    for fold in (0, 1):
        run = tmp_path / f"run{fold}"
        config = FitConfig(depth_multiplier=TEST_DEPTH, epochs=2, batch_size=8, seed=5, fold=fold)
        info = fit(tmp_path / "split", run, config, base_checkpoint=imagenet_ckpt, cache_dir=cache)
        assert info.config.fold == fold
        # the held-out fold scores the run, so it must not choose its epoch (issue 18, 5)
        assert info.selected_epoch == 2 and info.selection is not None
        assert info.selection.startswith("fixed 2 epochs chosen beforehand")
        assert info.fingerprints["val"] == folds.for_fold(fold).fingerprints["val"]
        runs.append(run)
    summary = cross_validate(runs)
    assert summary.folds == [0, 1] and summary.total_folds == 2
    assert [m.n for m in summary.per_fold] == [
        len(folds.for_fold(i).entries("val")) for i in (0, 1)
    ]
    accuracies = [m.accuracy.value for m in summary.per_fold]
    assert None not in accuracies
    assert summary.mean["accuracy"] == pytest.approx(sum(accuracies) / 2)  # type: ignore[arg-type]
    assert summary.sd["accuracy"] is not None
    with pytest.raises(RunError, match="two runs of the same fold"):
        cross_validate([runs[0], runs[0]])
    out = train("evaluate", *runs)
    assert out.returncode == 0, out.stderr
    assert "over 2 of 2 folds, SYNTHETIC data (mean ± sd):" in out.stdout
    assert "accuracy" in out.stdout and " ± " in out.stdout
    assert "fixed number of epochs chosen beforehand" in out.stdout


def test_an_empty_test_split_needs_allow_no_test(
    synth_data: Path, split_dir: Path, imagenet_ckpt: Path, signing_key: Path, tmp_path: Path
) -> None:
    prepare(synth_data, tmp_path / "split", val=0.2, test=0.0, seed=3)
    fit(
        tmp_path / "split",
        tmp_path / "run",
        FitConfig(depth_multiplier=TEST_DEPTH, epochs=2, batch_size=8, seed=5),
        base_checkpoint=imagenet_ckpt,
        cache_dir=split_dir / BOTTLENECK_CACHE_DIR,
    )
    options = ExportOptions(
        name="notest",
        version="1",
        precision="fp16",
        sign_key=signing_key,
        base_is=TEST_BASE,
        allow_no_skill=True,
    )
    with pytest.raises(ExportError, match=r"the test split of .* is empty"):
        export(tmp_path / "run", tmp_path / "bundle", options)
    assert not (tmp_path / "bundle").exists()
    bundle = export(
        tmp_path / "run",
        tmp_path / "bundle",
        ExportOptions(**{**options.__dict__, "allow_no_test": True}),
    )
    m = bundle.manifest
    assert m.figures is not None and m.figures.split == "val" and m.figures.n == 8
    assert m.provenance.allow_no_test is True
    assert "**no test split**" in (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
