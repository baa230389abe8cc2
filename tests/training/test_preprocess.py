"""Training's TensorFlow preprocessing agrees with the node's OpenCV preprocessing.

Bound: |TF - node| <= 1/127.5 (one 8-bit step after scaling to [-1, 1]) per value, and
mean |TF - node| <= 0.35/127.5. Justification: both crop identically (the same
`central_crop` integer arithmetic, asserted below) and sample the same half-pixel
bilinear grid, so the only differences are arithmetic. TensorFlow interpolates in
float32 and keeps the fraction; OpenCV interpolates uint8 with 11-bit fixed-point
weights and rounds the result to uint8, so it is off by the rounding (<= 0.5 step) plus
the weight quantisation (a small fraction of a step), together < 1 step. Measured on the
images below: max 0.81 step, mean 0.27 step. Where no resize is needed (the crop is
already 299x299) both are exact and must agree to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from cellwatch.node.decode import ImageLimits, decode_image
from cellwatch.node.preprocess import central_crop_box, preprocess
from cellwatch.shared.manifest import PreprocessingSpec
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.synth import smear
from cellwatch.training.tfcompat import tf
from tests import images

STEP = 1.0 / 127.5
MAX_DIFF = STEP
MEAN_DIFF = 0.35 * STEP


def payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    smears = {
        f"synthetic-{label}-{i}.tif": cv2.imencode(
            ".tif", cv2.cvtColor(smear(label, 9, i), cv2.COLOR_RGB2BGR)
        )[1].tobytes()
        for i, label in enumerate([0, 1, 0, 1])
    }
    noise = rng.integers(0, 256, (341, 341, 3), dtype=np.uint8)  # crop is exactly 299
    big = cv2.resize(smear(1, 9, 9, size=512), (2592, 1944))  # ALL-IDB1 size: reduced decode
    return {
        **smears,
        "640x480.jpg": images.jpeg(),
        "1x1.png": images.one_pixel_png(),
        "16bit.tif": images.tiff16(),
        "gray.jpg": images.gray_jpeg(90),
        "rgba.png": images.rgba_png(),
        "341x341-noise.png": cv2.imencode(".png", noise)[1].tobytes(),
        "2592x1944.jpg": cv2.imencode(".jpg", big)[1].tobytes(),
        "synthetic-jpeg.jpg": cv2.imencode(".jpg", smear(1, 9, 20))[1].tobytes(),
    }


@pytest.fixture(scope="module")
def pre() -> Iterator[Preprocessor]:
    with Preprocessor() as p:
        yield p


@pytest.mark.parametrize("name", sorted(payloads()))
def test_tensorflow_matches_node_preprocessing(pre: Preprocessor, name: str) -> None:
    rgb = decode_image(payloads()[name], ImageLimits(), target_size=299)
    ours = pre.eval(rgb)
    node = preprocess(rgb, PreprocessingSpec())[0]
    assert ours.shape == node.shape == (299, 299, 3) and ours.dtype == np.float32
    diff = np.abs(ours - node)
    if central_crop_box(rgb.shape[0], rgb.shape[1], 0.875)[2:] == (299, 299):
        assert diff.max() <= 1e-6, name
    assert diff.max() <= MAX_DIFF + 1e-6, (name, diff.max() / STEP)
    assert diff.mean() <= MEAN_DIFF, (name, diff.mean() / STEP)
    assert ours.min() >= -1.0 and ours.max() <= 1.0


@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 3), (257, 257), (480, 640), (341, 341), (1944, 2592), (300, 17)]
)
def test_crop_box_is_tensorflows(shape: tuple[int, int]) -> None:
    h, w = shape
    index = np.arange(h * w, dtype=np.int32).reshape(h, w, 1)
    cropped = tf.image.central_crop(tf.constant(index), 0.875).numpy()
    top, left, ch, cw = central_crop_box(h, w, 0.875)
    assert cropped.shape[:2] == (ch, cw)
    assert int(cropped[0, 0, 0]) == int(index[top, left, 0])


def test_augmentation_is_training_only_random_and_seeded() -> None:
    rgb = smear(1, 3, 1)
    with Preprocessor(augment_seed=4) as a, Preprocessor(augment_seed=4) as b:
        first = [a.augment(rgb) for _ in range(3)]
        second = [b.augment(rgb) for _ in range(3)]
        evals = {a.eval(rgb).tobytes(), a.eval(rgb).tobytes()}
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.shape == (299, 299, 3) and x.min() >= -1.0 and x.max() <= 1.0
    assert not np.array_equal(first[0], first[1])
    assert len(evals) == 1
    with Preprocessor() as plain, pytest.raises(RuntimeError):
        plain.augment(rgb)
