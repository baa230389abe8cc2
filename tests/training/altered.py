"""Altered copies of an image that a perceptual hash misses (issue 18, point 4): the
augmented copies the 2018 workflow saved to disk. Used by test_leakage.py and by the
measurement in training/README.md ("Leakage")."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Alteration = Callable[[np.ndarray], np.ndarray]


def crop(fraction: float, dx: float = 0.3, dy: float = 0.6) -> Alteration:
    """A crop of fraction of each side (offset dx, dy of the slack), resized back."""

    def alter(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        ch, cw = round(h * fraction), round(w * fraction)
        y, x = round((h - ch) * dy), round((w - cw) * dx)
        part = np.ascontiguousarray(rgb[y : y + ch, x : x + cw])
        return np.asarray(cv2.resize(part, (w, h), interpolation=cv2.INTER_LINEAR))

    return alter


def rotate(degrees: float) -> Alteration:
    def alter(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
        return np.asarray(cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))

    return alter


def shift(pixels: int) -> Alteration:
    def alter(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        m = np.array([[1, 0, pixels], [0, 1, pixels]], np.float32)
        return np.asarray(cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))

    return alter


def equalise(rgb: np.ndarray) -> np.ndarray:
    """Histogram equalisation of the luma (colours kept)."""
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    ycc[..., 0] = cv2.equalizeHist(ycc[..., 0])
    return np.asarray(cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB))


def zoom(factor: float) -> Alteration:
    """Magnified by factor about the centre (the centre 1/factor of each side, resized)."""
    return crop(1.0 / factor, 0.5, 0.5)


ALTERATIONS: dict[str, Alteration] = {
    "crop 80%": crop(0.8),
    "crop 70%": crop(0.7),
    "rotation 20 deg": rotate(20),
    "shift 20 px": shift(20),
    "histogram equalisation": equalise,
    "zoom 10%": zoom(1.1),
}
