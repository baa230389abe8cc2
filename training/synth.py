"""SYNTHETIC blood-smear images in the ALL-IDB layout, for demos and tests only.

Each image imitates an ALL-IDB2 crop: a pale background with red cells (central
pallor, soft edges) and one white cell near the centre. An ALL blast (`_1`) is a
large cell with a large, slightly irregular nucleus of fine, pale chromatin with
nucleoli and a thin basophilic cytoplasm rim; a normal lymphocyte (`_0`) is smaller,
with a round, dark nucleus of coarse chromatin clumps. Sizes, colours, stain,
position, blur and noise vary so that the classes overlap and are learnable but not
trivially. Output is a deterministic function of (seed, index).

`shift` makes the same smears as another lab's would look: `stain` another stain batch
(more eosin, less haematoxylin: redder, paler nuclei), `blur` an out-of-focus
microscope. A node's drift figures (README, "Drift") move away from a bundle trained
on unshifted ones; the demo and the drift tests use them.

These are not real smears: every file carries a SYNTHETIC tag (a TIFF ImageDescription,
a JPEG comment) and the folder a SYNTHETIC.json marker; `prepare` flags a split
synthetic when either is found, so copies moved elsewhere stay flagged, and runs,
metrics and bundles made from it are flagged `synthetic`.
"""

from __future__ import annotations

import io
import logging
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from cellwatch.shared.base import Strict
from cellwatch.training import LABELS
from cellwatch.training.errors import DataError
from cellwatch.training.layout import SYNTHETIC_MARKER, SYNTHETIC_TAG, allidb_name
from cellwatch.training.outdir import staged_dir
from cellwatch.training.progress import track

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
"""2: every file carries SYNTHETIC_TAG (layout.py)."""
_IMAGE_DESCRIPTION = 270
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 92]
ImageFormat = Literal["tif", "jpg"]
Shift = Literal["none", "stain", "blur"]
_SUFFIX: dict[str, str] = {"tif": ".tif", "jpg": ".jpg"}
OTHER_STAIN = np.array([1.16, 0.84, 0.78], np.float32)
"""`stain`: channel gains of another stain batch (RGB)."""
DEFOCUS_SIGMA = 3.0
"""`blur`: the Gaussian blur of a microscope out of focus (pixels at 257 px)."""


class SynthInfo(Strict):
    """SYNTHETIC.json: what generated this folder."""

    schema_: Literal["cellwatch.synthetic/1"] = Field("cellwatch.synthetic/1", alias="schema")
    synthetic: Literal[True] = True
    note: str = "SYNTHETIC blood-smear images for demos and tests; not real data, not for diagnosis"
    generator_version: int = GENERATOR_VERSION
    seed: int = Field(ge=0)
    count: int = Field(ge=1)
    size: int = Field(ge=64, le=4096)
    format: ImageFormat
    shift: Shift = "none"
    labels: list[str] = Field(default_factory=lambda: list(LABELS))
    created_at: datetime


def labels_for(count: int, seed: int) -> list[int]:
    """Balanced labels (alternating, then shuffled by seed): index i gets labels[i]."""
    labels = np.array([i % 2 for i in range(count)], dtype=np.int64)
    np.random.default_rng([seed, 0x5EED]).shuffle(labels)
    return [int(x) for x in labels]


def smear(label: int, seed: int, index: int, size: int = 257, shift: Shift = "none") -> np.ndarray:
    """One synthetic smear, RGB uint8 (size, size, 3); label 1 = ALL blast, 0 = normal;
    `shift`: the same smear as another stain or an unfocused microscope shows it."""
    rng = np.random.default_rng([seed, index, label])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    s = size / 257.0  # features are designed at ALL-IDB2's 257 px and scale with size

    background = np.array([236, 222, 218], np.float32) + rng.normal(0, 6, 3)
    img = np.broadcast_to(background, (size, size, 3)).copy()
    shade = 1.0 - 0.08 * (((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / 2) ** 2)
    img *= shade[..., None]

    red = np.array([214, 120, 124], np.float32) + rng.normal(0, 10, 3)
    for _ in range(int(rng.integers(10, 22))):
        r = rng.uniform(13, 19) * s
        cx, cy = rng.uniform(-0.1, 1.1, 2) * size
        disc = _disc(xx, yy, cx, cy, r, edge=1.5 * s)
        pallor = _disc(xx, yy, cx, cy, r * rng.uniform(0.35, 0.55), edge=4 * s) * 0.45
        colour = red * rng.uniform(0.92, 1.06)
        cell = colour + (background - colour) * pallor[..., None]
        img = img * (1 - disc[..., None] * 0.9) + cell * (disc[..., None] * 0.9)

    cx, cy = size / 2 + rng.normal(0, 0.04 * size, 2)
    nucleus_rgb: np.ndarray
    if label == 1:
        cell_r = rng.uniform(34, 52) * s
        nucleus_r = cell_r * rng.uniform(0.78, 0.9)
        nucleus_rgb = np.array([132, 92, 168], np.float32)
        texture_sigma, texture_amp, irregular = 0.9 * s, 14.0, 0.045
    else:
        cell_r = rng.uniform(27, 42) * s
        nucleus_r = cell_r * rng.uniform(0.7, 0.86)
        nucleus_rgb = np.array([96, 58, 134], np.float32)
        texture_sigma, texture_amp, irregular = 2.8 * s, 30.0, 0.025
    nucleus_rgb = nucleus_rgb + rng.normal(0, 12, 3)
    cytoplasm_rgb = np.array([172, 178, 222], np.float32) + rng.normal(0, 10, 3)

    cyto = _disc(xx, yy, cx, cy, cell_r, edge=1.5 * s)
    img = img * (1 - cyto[..., None]) + cytoplasm_rgb * cyto[..., None]
    ncx, ncy = cx + rng.normal(0, 0.05 * cell_r), cy + rng.normal(0, 0.05 * cell_r)
    nucleus = _blob(xx, yy, ncx, ncy, nucleus_r, irregular, rng, edge=1.5 * s)
    chromatin = _texture(rng, size, texture_sigma) * texture_amp
    nuc_img = nucleus_rgb + chromatin[..., None]
    if label == 1:
        for _ in range(int(rng.integers(1, 4))):
            ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.55) * nucleus_r
            nucleolus = _disc(
                xx,
                yy,
                ncx + dist * np.cos(ang),
                ncy + dist * np.sin(ang),
                rng.uniform(3, 6) * s,
                edge=2 * s,
            )
            nuc_img = nuc_img + nucleolus[..., None] * np.array([30, 26, 24], np.float32)
    img = img * (1 - nucleus[..., None]) + nuc_img * nucleus[..., None]

    stain = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    if shift == "stain":
        stain = stain * OTHER_STAIN
    img = img * stain + rng.normal(0, 6)
    blur = rng.uniform(0.0, 1.6) * s
    if shift == "blur":
        blur = float(np.hypot(blur, DEFOCUS_SIGMA * s))
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img = img + rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    return np.asarray(np.clip(img + 0.5, 0, 255), dtype=np.uint8)


def write_dataset(
    out: Path,
    count: int,
    seed: int,
    *,
    size: int = 257,
    image_format: ImageFormat = "tif",
    force: bool = False,
    shift: Shift = "none",
) -> SynthInfo:
    """Write count synthetic smears into out (created) as `ImNNN_L.tif|jpg` + SYNTHETIC.json."""
    if count < 1:
        raise DataError("--count must be at least 1")
    if not 64 <= size <= 4096:
        raise DataError("--size must be between 64 and 4096")
    info = SynthInfo(
        seed=seed,
        count=count,
        size=size,
        format=image_format,
        shift=shift,
        created_at=datetime.now(UTC),
    )
    with staged_dir(out, marker=SYNTHETIC_MARKER, force=force, what="synthetic data folder") as tmp:
        labels = labels_for(count, seed)
        for i, label in track(enumerate(labels, start=1), "synthesising", total=count):
            rgb = smear(label, seed, i, size, shift)
            path = tmp / allidb_name(i, label, _SUFFIX[image_format])
            path.write_bytes(encode(rgb, image_format))
        (tmp / SYNTHETIC_MARKER).write_text(info.model_dump_json(by_alias=True, indent=2) + "\n")
    log.info(
        "wrote %d SYNTHETIC images to %s (seed %d%s)",
        count,
        out,
        seed,
        "" if shift == "none" else f", shift {shift}",
    )
    return info


def encode(rgb: np.ndarray, image_format: ImageFormat) -> bytes:
    """The image file's bytes, carrying SYNTHETIC_TAG: in a TIFF's ImageDescription tag,
    or in a JPEG comment segment right after its start marker (pixels untouched)."""
    if image_format == "tif":
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="TIFF", tiffinfo={_IMAGE_DESCRIPTION: SYNTHETIC_TAG})
        return out.getvalue()
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _JPEG_PARAMS)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise DataError("OpenCV could not encode a synthetic JPEG")
    data = jpeg.tobytes()
    comment = b"\xff\xfe" + struct.pack(">H", len(SYNTHETIC_TAG) + 2) + SYNTHETIC_TAG
    return data[:2] + comment + data[2:]  # after SOI (FF D8)


def _disc(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, edge: float
) -> np.ndarray:
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    return np.clip((r - dist) / max(edge, 1e-3) + 0.5, 0.0, 1.0)


def _blob(
    xx: np.ndarray,
    yy: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    irregular: float,
    rng: np.random.Generator,
    edge: float,
) -> np.ndarray:
    """A disc whose radius wobbles with angle (a slightly irregular nucleus)."""
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = np.zeros_like(theta)
    for k in (2, 3, 5):
        wobble += rng.normal(0, irregular) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    return np.clip((r * (1 + wobble) - dist) / max(edge, 1e-3) + 0.5, 0.0, 1.0)


def _texture(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smoothed noise; small sigma = fine chromatin, large = clumps."""
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), max(sigma, 0.3))
    std = float(smooth.std()) or 1.0
    return np.asarray((smooth - smooth.mean()) / std, dtype=np.float32)
