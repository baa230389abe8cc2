"""How image files are named and where labels come from (the data-set layouts we read).

- ALL-IDB1 / ALL-IDB2: one flat folder of `ImNNN_L.jpg` (IDB1) or `ImNNN_L.tif`
  (IDB2), where L is 1 for an ALL (blast) image and 0 for a normal one. The
  downloads' image sub-folder (`ALL_IDB1/im/`, `ALL_IDB2/img/`) is found when given
  the top folder.
- Class folders: one sub-folder per class, named for the class (aliases below),
  images of any supported format inside.

Label index order is `cellwatch.training.LABELS`: 0 = normal, 1 = ALL.
"""

from __future__ import annotations

import re
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".tif", ".tiff", ".png", ".bmp"})
ALLIDB_NAME = re.compile(r"^Im(?P<id>\d{3,})_(?P<label>[01])\.(?:jpe?g|tiff?)$", re.IGNORECASE)
ALLIDB_SUBFOLDERS = ("im", "img")
"""ALL-IDB downloads keep the images in `im/` or `img/` (IDB1's blast coordinates in `xyc/`)."""
SYNTHETIC_MARKER = "SYNTHETIC.json"
"""Written by `cellwatch-train synth`; marks a data folder (and all that derives from it)."""
SYNTHETIC_TAG = b"cellwatch SYNTHETIC image: not real data, not for diagnosis"
"""Written into every file `synth` makes (a TIFF ImageDescription tag, a JPEG comment),
so `prepare` knows a synthetic image wherever it is copied, marker file or not."""


def is_synthetic_file(data: bytes) -> bool:
    """Whether image bytes carry the synthetic tag (in a TIFF tag or JPEG comment)."""
    return SYNTHETIC_TAG in data


CLASS_FOLDER_ALIASES: dict[str, int] = {
    "normal": 0,
    "hem": 0,
    "healthy": 0,
    "0": 0,
    "all": 1,
    "blast": 1,
    "blasts": 1,
    "leukemia": 1,
    "leukaemia": 1,
    "1": 1,
}


def is_image(path: Path) -> bool:
    suffix_ok = path.suffix.lower() in IMAGE_SUFFIXES
    return suffix_ok and path.is_file() and not path.name.startswith(".")


def allidb_label(name: str) -> int | None:
    """The label an ALL-IDB file name carries, or None if the name is not ALL-IDB style."""
    m = ALLIDB_NAME.match(name)
    return int(m.group("label")) if m else None


def allidb_name(index: int, label: int, suffix: str) -> str:
    """`Im001_1.tif` style name (index from 1)."""
    return f"Im{index:03d}_{label}{suffix}"


def class_folder_label(name: str) -> int | None:
    return CLASS_FOLDER_ALIASES.get(name.strip().lower())


def group_key(path: Path) -> str:
    """The default group of a file: the file itself (its name, case-folded).

    ALL-IDB1's `Im001_1.jpg` and ALL-IDB2's `Im001_1.tif` are NOT one source: the two
    sets are numbered independently. Which smear or patient an image comes from is
    not in the names; give it with `prepare --groups` (groups.py).
    """
    return path.name.lower()
