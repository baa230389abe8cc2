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


def write_field(
    folder: Path,
    samples: list[tuple[Path, str, str, str]],
    *,
    labelled: bool = True,
    brighten: int = 0,
) -> list[str]:
    """A field directory as `cellwatch-hub samples export` writes it, labels filled in:
    samples are (image file, label, reason, source); each image is re-encoded as PNG
    (brightened by `brighten` levels: a near-copy, not the same pixels) and named by its
    id. Returns the ids in row order."""
    from datetime import UTC, datetime, timedelta

    from cellwatch.shared.samples import (
        SAMPLES_CSV,
        SampleReason,
        SampleRow,
        sample_file_name,
        sample_id,
        write_samples_csv,
    )

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    start = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    for i, (image, label, reason, source) in enumerate(samples):
        pixels = cv2.imread(str(image), cv2.IMREAD_COLOR)
        assert pixels is not None, image
        if brighten:
            pixels = cv2.add(pixels, np.full_like(pixels, brighten))
        ok, png = cv2.imencode(".png", pixels)
        assert ok
        data = png.tobytes()
        sid = sample_id(data)
        (folder / sample_file_name(sid)).write_bytes(data)
        rows.append(
            SampleRow(
                id=sid,
                source=source,
                node="node-1",
                model="all-test@0.0.1",
                p_all=0.5,
                predicted="ALL",
                reason=SampleReason(reason),
                collected_at=start + timedelta(hours=i),
                label=label if labelled else None,
            )
        )
    write_samples_csv(folder / SAMPLES_CSV, rows)
    return [r.id for r in rows]
