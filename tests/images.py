"""Image payloads for tests: good ones in every supported format and the bad inputs
the node must survive (DESIGN.md and the node issue's list)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def colour_image(bgr: tuple[int, int, int], h: int = 480, w: int = 640) -> np.ndarray:
    """A BGR image of one colour with a little texture (so JPEG has something to code)."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = bgr
    yy, xx = np.mgrid[0:h, 0:w]
    img[..., 1] = np.clip(img[..., 1].astype(int) + ((xx + yy) % 16), 0, 255).astype(np.uint8)
    return img


RED = (40, 40, 220)  # BGR: classified "ALL" by the toy model
BLUE = (220, 40, 40)  # BGR: classified "normal"


def encode(img: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


def jpeg(bgr: tuple[int, int, int] = RED, h: int = 480, w: int = 640) -> bytes:
    return encode(colour_image(bgr, h, w), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])


def png(bgr: tuple[int, int, int] = RED, h: int = 480, w: int = 640) -> bytes:
    return encode(colour_image(bgr, h, w), ".png")


def bmp(bgr: tuple[int, int, int] = RED) -> bytes:
    return encode(colour_image(bgr, 120, 160), ".bmp")


def tiff16(bgr: tuple[int, int, int] = RED, h: int = 240, w: int = 320) -> bytes:
    img = colour_image(bgr, h, w).astype(np.uint16) * 257
    return encode(img, ".tiff")


def rgba_png(bgr: tuple[int, int, int] = RED) -> bytes:
    img = colour_image(bgr, 240, 320)
    alpha = np.full((*img.shape[:2], 1), 128, dtype=np.uint8)
    return encode(np.concatenate([img, alpha], axis=2), ".png")


def gray_jpeg(level: int = 128) -> bytes:
    return encode(np.full((240, 320), level, dtype=np.uint8), ".jpg")


def one_pixel_png(bgr: tuple[int, int, int] = RED) -> bytes:
    return encode(np.array([[bgr]], dtype=np.uint8), ".png")


def truncated_jpeg() -> bytes:
    data = jpeg()
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_header_png(
    side: int = 100_000, bit_depth: int = 8, colour_type: int = 2, height: int | None = None
) -> bytes:
    """A tiny PNG whose IHDR claims side x side pixels (a decompression bomb's header);
    colour_type 2 = RGB, 6 = RGBA; bit_depth 8 or 16."""
    ihdr = struct.pack(">IIBBBBB", side, height or side, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def random_bytes(n: int = 4096, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


TEXT = b"This is not an image, it is a text file.\n"


def flat_png(bgr: tuple[int, int, int] = RED, h: int = 6000, w: int = 8000) -> bytes:
    """A large one-colour PNG: a small payload that takes long to decode (~0.5 s)."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = bgr
    return encode(img, ".png")
