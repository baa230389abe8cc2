"""`synth`: deterministic, ALL-IDB named, labelled SYNTHETIC, decodable by the node."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellwatch.node.decode import ImageLimits, decode_image
from cellwatch.training.errors import TrainingError
from cellwatch.training.layout import SYNTHETIC_MARKER, allidb_label
from cellwatch.training.synth import labels_for, smear, write_dataset


def test_same_seed_same_images_other_seed_other_images() -> None:
    a = smear(1, seed=5, index=3)
    np.testing.assert_array_equal(a, smear(1, seed=5, index=3))
    assert not np.array_equal(a, smear(1, seed=6, index=3))
    assert a.shape == (257, 257, 3) and a.dtype == np.uint8


def test_classes_differ_as_described() -> None:
    """Blasts: larger cell, paler nucleus than a normal lymphocyte's (on average)."""

    def purple_area_and_darkness(img: np.ndarray) -> tuple[float, float]:
        r, g, b = (img[..., i].astype(float) for i in range(3))
        nucleus = (b > g + 25) & (r < 180)
        return float(nucleus.mean()), float(img[nucleus].mean())

    blasts = [purple_area_and_darkness(smear(1, 2, i)) for i in range(12)]
    normals = [purple_area_and_darkness(smear(0, 2, i)) for i in range(12)]
    assert np.mean([a for a, _ in blasts]) > 1.3 * np.mean([a for a, _ in normals])
    assert np.mean([d for _, d in blasts]) > np.mean([d for _, d in normals])


def test_write_dataset_layout(tmp_path: Path) -> None:
    out = tmp_path / "smears"
    info = write_dataset(out, 10, seed=4, image_format="jpg", size=128)
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".jpg")
    assert names[0] == f"Im001_{labels_for(10, 4)[0]}.jpg"
    labels = [allidb_label(n) for n in names]
    assert labels.count(0) == labels.count(1) == 5
    marker = json.loads((out / SYNTHETIC_MARKER).read_text())
    assert marker["synthetic"] is True and marker["seed"] == 4 and info.count == 10
    rgb = decode_image((out / names[0]).read_bytes(), ImageLimits())
    assert rgb.shape == (128, 128, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_existing_folder_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "smears"
    write_dataset(out, 2, seed=1)
    with pytest.raises(TrainingError, match="already exists"):
        write_dataset(out, 2, seed=1)
    write_dataset(out, 4, seed=2, force=True)
    assert len(list(out.glob("*.tif"))) == 4
    unrelated = tmp_path / "home"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="refusing to replace"):
        write_dataset(unrelated, 2, seed=1, force=True)
    assert (unrelated / "notes.txt").read_text() == "keep me"
