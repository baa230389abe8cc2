"""The serving preprocessing, OpenCV implementation (DESIGN.md, Preprocessing).

RGB uint8 -> central crop (TF's `central_crop` arithmetic) -> bilinear resize with
half-pixel centres (OpenCV INTER_LINEAR == TF2 `tf.image.resize` bilinear without
antialias) -> float32 `x / 127.5 - 1` -> NHWC batch of one. Training's TensorFlow
implementation (`cellwatch.training.preprocess`) must agree with this one.

The node does the first two steps (`crop_and_resize`, 8-bit pixels) and OpenVINO the
last (`to_model_range`, folded into the compiled model by node/engine.py): a quarter
of the bytes to hand over, no float pass in Python. `preprocess` is all of it, in
NumPy: what the model sees (tests bound the compiled model's arithmetic against it).
"""

from __future__ import annotations

import cv2
import numpy as np

from cellwatch.shared.manifest import PreprocessingSpec

JPEG_MIN_SIDE_FACTOR = 2
"""Decode JPEGs at 1/2, 1/4 or 1/8 scale while the short side stays >= 2 x input size."""


def jpeg_scale_denominator(width: int, height: int, size: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps min(width, height)/d >= 2 * size."""
    short = min(width, height)
    for denom in (8, 4, 2):
        if short // denom >= JPEG_MIN_SIDE_FACTOR * size:
            return denom
    return 1


def central_crop_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) exactly as tf.image.central_crop computes them."""
    if fraction >= 1.0:
        return 0, 0, height, width
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    return top, left, height - 2 * top, width - 2 * left


PIXEL_SCALE = 127.5
PIXEL_OFFSET = 1.0
"""Model input = pixel / PIXEL_SCALE - PIXEL_OFFSET: [0, 255] -> [-1, 1]."""


def crop_and_resize(rgb: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> uint8 (1, S, S, 3): the pixels the node hands OpenVINO."""
    top, left, ch, cw = central_crop_box(rgb.shape[0], rgb.shape[1], spec.central_crop_fraction)
    crop = rgb[top : top + ch, left : left + cw]
    size = spec.size
    if crop.shape[0] != size or crop.shape[1] != size:
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)[np.newaxis]
    return np.ascontiguousarray(crop)[np.newaxis]


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (training's arithmetic, exactly)."""
    out = pixels.astype(np.float32)
    out *= np.float32(1.0 / PIXEL_SCALE)
    out -= np.float32(PIXEL_OFFSET)
    return out


def preprocess(rgb: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (1, S, S, 3) in [-1, 1]."""
    return to_model_range(crop_and_resize(rgb, spec))
