"""Which files the client sends: image files named on the command line or found
in the folders named there."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from cellwatch.client.errors import InputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""The formats a node decodes (DESIGN.md, Topics); folders are searched for these."""

_IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def expand(paths: Iterable[Path], *, recursive: bool = False) -> list[Path]:
    """Files named, plus the image files in the folders named (sorted; subfolders too
    with recursive). InputError for a path that does not exist or a folder without
    images. A file named explicitly is sent whatever its name (the node judges it)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(p for p in path.glob(pattern) if p.is_file() and is_image_name(p))
            if not found:
                suffixes = " ".join(sorted(IMAGE_SUFFIXES))
                where = " or its subfolders" if recursive else ""
                hint = "" if recursive else " (--recursive searches subfolders)"
                raise InputError(f"{path}{where} has no images ({suffixes}){hint}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise InputError(f"{path} is not a regular file")
        else:
            raise InputError(f"{path} does not exist")
    return files


def image_id_for(name: str | None, payload: bytes) -> str:
    """The image_id sent with an image: the file's stem made safe, or (for bytes) what
    the node would derive itself (the first 16 hex digits of the SHA-256)."""
    if name:
        candidate = _UNSAFE.sub("_", name)[:128]
        if _IMAGE_ID_RE.match(candidate):
            return candidate
    return hashlib.sha256(payload).hexdigest()[:16]


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
