"""`cellwatch-train` as a user runs it: help without TensorFlow, and bad input answered
with one clear line on stderr and exit code 2 (never a traceback), writing nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.training.helpers import allidb, assert_one_line_error, train, write_images
from tests.training.sizes import TEST_BASE


def test_help_is_fast_and_does_not_load_tensorflow() -> None:
    code = "import sys, cellwatch.training.cli; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for command in ("synth", "prepare", "fit", "evaluate", "export", "keygen"):
        result = train(command, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        ([], "is empty"),
        (["Im001_0.tif", "Im002_0.tif", "Im003_0.tif"], "one class only (normal)"),
        (["Im001_1.tif", "Im002_0.tif", "scan_0001.tif"], "fit no known layout"),
        (["Im001_1.tif", "Im002_0.tif", "Im003_1.tif", "Im004_0.tif"], "split too small"),
    ],
)
def test_prepare_bad_folders(tmp_path: Path, names: list[str], fragment: str) -> None:
    write_images(tmp_path / "data", names)
    (tmp_path / "data").mkdir(exist_ok=True)
    assert_one_line_error(
        train("prepare", tmp_path / "data", "--out", tmp_path / "split"), fragment
    )
    assert not (tmp_path / "split").exists()


def test_prepare_reports_class_balance_and_skipped(tmp_path: Path) -> None:
    write_images(tmp_path / "data", allidb(10))
    (tmp_path / "data" / "Im099_1.tif").write_bytes(b"II*\x00" + b"\x01" * 64)
    result = train("prepare", tmp_path / "data", "--out", tmp_path / "split", "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert "train    12 images: normal 6 (50%), ALL 6 (50%)" in result.stdout
    assert "skipped 1 unreadable images" in result.stdout
    assert "Im099_1.tif" in result.stderr  # the warning names the file


@pytest.mark.slow
def test_fit_bad_checkpoints(tmp_path: Path) -> None:
    write_images(tmp_path / "data", allidb(5))
    assert train("prepare", tmp_path / "data", "--out", tmp_path / "split").returncode == 0
    result = train(
        "fit",
        tmp_path / "split",
        "--out",
        tmp_path / "run",
        "--checkpoint",
        tmp_path / "inception_v3.ckpt",
    )
    assert_one_line_error(result, "does not exist")  # a junk checkpoint: see test_fit
    assert not (tmp_path / "run").exists()
    assert_one_line_error(
        train("fit", tmp_path / "nosplit", "--out", tmp_path / "run"), "is not a split"
    )


@pytest.mark.slow
def test_export_into_existing_bundle_and_evaluate_non_run(
    trained_run: Path, signing_key: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "bundle"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    result = train(
        "export",
        trained_run,
        "--out",
        existing,
        "--name",
        "x",
        "--version",
        "1",
        "--sign-key",
        signing_key,
    )
    assert_one_line_error(result, "already exists (use --force")
    assert (existing / "manifest.json").read_text() == "{}"
    assert_one_line_error(train("evaluate", tmp_path), "is not a training run")


def test_keygen(tmp_path: Path) -> None:
    result = train("keygen", tmp_path / "keys", "--name", "lab")
    assert result.returncode == 0 and "private" in result.stdout
    assert (tmp_path / "keys" / "lab.key").stat().st_mode & 0o077 == 0
    assert_one_line_error(train("keygen", tmp_path / "keys", "--name", "lab"), "already exists")
    shutil.rmtree(tmp_path / "keys")


def test_gate_settings_out_of_range_are_usage_errors(tmp_path: Path) -> None:
    for flag, value in (
        ("--min-agreement", "1.5"),
        ("--max-sensitivity-drop", "-0.1"),
        ("--max-prob-diff", "2"),
    ):
        result = train(
            *("export", tmp_path, "--out", tmp_path / "b", "--name", "x", "--version", "1"),
            *("--sign-key", tmp_path / "k", flag, value),
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"Invalid value for '{flag}'" in result.stderr, result.stderr
        assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_export_gate_failure_exits_3_naming_the_figure(
    trained_run: Path, bundle: Callable[[str], Path], signing_key: Path, tmp_path: Path
) -> None:
    from tests.training.runs import gate_threshold, inputs_of

    threshold, _ = gate_threshold(trained_run, bundle, inputs_of(trained_run)[0])
    result = train(
        *("export", trained_run, "--out", tmp_path / "b", "--name", "x", "--version", "1"),
        *("--precision", "fp16", "--sign-key", signing_key, "--threshold", f"{threshold!r}"),
        *("--base-is", TEST_BASE, "--allow-no-skill"),
    )
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the fp16 model fails the export gate"), result.stderr
    assert "top-1 agreement with TensorFlow" in last and "--allow-degraded" in last
    assert "Traceback" not in result.stderr and not (tmp_path / "b").exists()
