"""Helpers the training tests share: running `cellwatch-train` as a user does, checking its
one-line errors, and writing small image folders in the ALL-IDB naming."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def train(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "cellwatch-train"), *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=600,
        check=False,
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], fragment: str, exit_code: int = 2
) -> None:
    assert result.returncode == exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert not [line for line in lines[:-1] if line.startswith("error")]


def write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / name), img)


def allidb(n_per_class: int, suffix: str = ".tif") -> list[str]:
    return [f"Im{i:03d}_{i % 2}{suffix}" for i in range(1, 2 * n_per_class + 1)]


def nothing_written(parent: Path, out: Path) -> bool:
    return not out.exists() and not [p for p in parent.iterdir() if p.name.endswith(".partial")]
