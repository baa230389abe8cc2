"""`cellwatch-train groups` (issue 18, point 9): ALL-IDB2 crops mapped to the ALL-IDB1
smears they were cut from, on synthetic whole fields and crops cut from them."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from cellwatch.training.groups import read_groups
from cellwatch.training.smears import match_crops
from cellwatch.training.synth import smear
from tests.training.helpers import train

CROP = 257


def whole_field(seed: int) -> np.ndarray:
    """A synthetic ALL-IDB1-like field: 3 x 3 synthetic smears side by side (771 px)."""
    tiles = [smear(i % 2, seed, i) for i in range(9)]
    rows = [np.concatenate(tiles[r * 3 : r * 3 + 3], axis=1) for r in range(3)]
    return np.concatenate(rows, axis=0)


def write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_crops_are_mapped_to_their_smears(tmp_path: Path) -> None:
    idb1, idb2 = tmp_path / "ALL_IDB1" / "im", tmp_path / "ALL_IDB2" / "img"
    fields = {f"Im00{i}_{i % 2}.jpg": whole_field(40 + i) for i in range(1, 4)}
    fields["Im004_0.jpg"] = fields["Im003_1.jpg"].copy()  # the same smear twice: ambiguous
    for name, rgb in fields.items():
        write(idb1 / name, rgb)
    expected = {}
    cuts = [  # (field, y, x, quarter turns, mirrored)
        ("Im001_1.jpg", 100, 130, 0, False),
        ("Im001_1.jpg", 400, 20, 1, False),
        ("Im002_0.jpg", 0, 500, 2, True),
        ("Im002_0.jpg", 300, 300, 3, False),
        ("Im003_1.jpg", 50, 60, 0, False),
    ]
    for i, (name, y, x, turns, mirrored) in enumerate(cuts, start=1):
        crop = fields[name][y : y + CROP, x : x + CROP]
        crop = np.rot90(crop[:, ::-1] if mirrored else crop, turns)
        crop_name = f"Im{i:03d}_{i % 2}.tif"
        write(idb2 / crop_name, np.ascontiguousarray(crop))
        expected[crop_name] = name
    write(idb2 / "Im009_1.tif", smear(1, 99, 1))  # from no smear we have
    found = match_crops(tmp_path / "ALL_IDB1", tmp_path / "ALL_IDB2")
    got = {m.crop: m.smear for m in found.matches}
    assert got["Im009_1.tif"] is None and [m.crop for m in found.unmatched] == ["Im009_1.tif"]
    for crop_name, name in expected.items():
        if name == "Im003_1.jpg":
            assert got[crop_name] in ("Im003_1.jpg", "Im004_0.jpg")
        else:
            assert got[crop_name] == name, crop_name
    assert [m.crop for m in found.ambiguous] == ["Im005_1.tif"]

    out = tmp_path / "groups.csv"
    result = train("groups", tmp_path / "ALL_IDB1", tmp_path / "ALL_IDB2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "5 of 6 crops matched to 3 smears" in result.stdout
    assert "unmatched: Im009_1.tif" in result.stdout and "ambiguous: Im005_1.tif" in result.stdout
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    groups = read_groups(out, sorted(p.name for p in idb2.iterdir()))  # prepare accepts it
    assert groups["Im001_1.tif"] == groups["Im002_0.tif"] == "Im001_1.jpg"
    assert groups["Im009_1.tif"] == "unmatched:Im009_1.tif"
    again = train("groups", tmp_path / "ALL_IDB1", tmp_path / "ALL_IDB2", "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr
