"""The whole path through the CLI on a tiny SYNTHETIC set: synth -> prepare -> fit ->
evaluate -> keygen -> export, then the node (`cellwatch-node classify`) serves the bundle.

The node compiles the bundle itself, runs its golden self-test and classifies the test
images with its own decoder and OpenCV preprocessing; its probabilities must match what
training's TensorFlow evaluation wrote for the same files.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.signing import TrustedKeys
from tests.training.test_cli import BIN, ENV, train

pytestmark = pytest.mark.slow

NODE_VS_TRAINING = 0.01
"""|p_node - p_training| bound: the two preprocessings differ by <= 1/127.5 per input
value (test_preprocess), which moved these probabilities by at most 2e-3 when measured."""


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tiny_run_through_the_cli_is_served_by_the_node(tmp_path: Path) -> None:
    ok(train("synth", "data", "--count", "24", "--seed", "2", "--format", "jpg", cwd=tmp_path))
    out = ok(
        train("prepare", "data", "--out", "split", "--val", "0.17", "--test", "0.17", cwd=tmp_path)
    )
    assert "SYNTHETIC" in out
    fitted = train(
        "fit", "split", "--out", "run", "--epochs", "2", "--batch-size", "8", cwd=tmp_path
    )
    assert "RANDOM weights" in ok(fitted) + fitted.stderr
    assert "(SYNTHETIC data)" in fitted.stdout
    assert "accuracy" in ok(train("evaluate", "run", cwd=tmp_path))
    ok(train("keygen", "keys", "--name", "e2e", cwd=tmp_path))
    out = ok(
        train(
            "export",
            "run",
            "--out",
            "bundle",
            "--name",
            "all-e2e",
            "--version",
            "1.0.0",
            "--precision",
            "fp32",
            "--sign-key",
            "keys/e2e.key",
            cwd=tmp_path,
        )
    )
    assert "top-1 agreement 1.000" in out
    bundle = load_bundle(tmp_path / "bundle", TrustedKeys.load(tmp_path / "keys"))
    assert bundle.manifest.provenance["synthetic"] is True

    with (tmp_path / "run" / "eval-test" / "predictions.csv").open() as f:
        expected = {row["path"]: float(row["p_ALL"]) for row in csv.DictReader(f)}
    images = [tmp_path / "data" / name for name in sorted(expected)]
    # --force-f32: this is a parity check against TensorFlow's probabilities; on CPUs
    # where OpenVINO defaults to bf16 the node would differ by more than the bound.
    node = subprocess.run(
        [
            str(BIN / "cellwatch-node"),
            "classify",
            *map(str, images),
            "--bundle",
            str(tmp_path / "bundle"),
            "--trusted-keys",
            str(tmp_path / "keys"),
            "--force-f32",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )
    assert node.returncode == 0, node.stderr
    results = [json.loads(line) for line in node.stdout.splitlines()]
    assert len(results) == len(images) == 4
    for image, result in zip(images, results, strict=True):
        assert result["status"] == "ok" and result["model"]["name"] == "all-e2e"
        assert result["label"] in ("normal", "ALL")
        p_all = result["probabilities"]["ALL"]
        assert abs(p_all - expected[image.name]) <= NODE_VS_TRAINING, image.name
