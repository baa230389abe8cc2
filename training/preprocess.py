"""Preprocessing in TensorFlow: the serving definition, and training-only augmentation.

`eval_image` is the TensorFlow implementation of the one serving preprocessing
(DESIGN.md, Preprocessing) that `cellwatch.node.preprocess.preprocess` implements with
OpenCV: `tf.image.central_crop` (fraction 0.875), `tf.image.resize` bilinear with
half-pixel centres and no antialiasing to 299x299, then `x * (1/127.5) - 1` in
float32 (the node's exact arithmetic). Evaluation, bottlenecks, calibration and
golden vectors all use it; tests/training/test_preprocess.py bounds its difference
from the node's output on decoded images.

`train_image` adds the training-time augmentation (random crop, flips and quarter
turns, colour jitter); it is used only for the training split in `finetune` mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cellwatch.shared.manifest import PreprocessingSpec
from cellwatch.training.tfcompat import Tensor, new_session, seed_everything, tf, tf1

SPEC = PreprocessingSpec()
_SCALE = np.float32(1.0 / 127.5)


def eval_image(rgb: Tensor, spec: PreprocessingSpec = SPEC) -> Tensor:
    """RGB uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1], as the node computes it."""
    image = rgb
    if spec.central_crop_fraction < 1.0:
        image = tf.image.central_crop(image, spec.central_crop_fraction)
    resized = tf.image.resize(
        image[tf.newaxis], [spec.size, spec.size], method="bilinear", antialias=False
    )[0]
    return tf.cast(resized, tf.float32) * tf.constant(_SCALE) - 1.0


def train_image(rgb: Tensor, spec: PreprocessingSpec = SPEC, *, seed: int = 1) -> Tensor:
    """RGB uint8 [H, W, 3] -> augmented float32 [S, S, 3] in [-1, 1] (training only).

    The other random ops take their seeds from the graph seed; the crop sampler
    insists on an explicit non-zero one when determinism is on.
    """
    image = tf.image.convert_image_dtype(rgb, tf.float32)  # [0, 1]
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.5,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.45, 1.0),
        max_attempts=20,
        use_image_if_no_bounding_boxes=True,
        seed=seed,
    )
    image = tf.slice(image, begin, size)
    image = tf.image.resize(image[tf.newaxis], [spec.size, spec.size], method="bilinear")[0]
    image = tf.image.random_flip_left_right(image)
    image = tf.image.random_flip_up_down(image)  # smears have no up or down
    image = tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
    image = tf.image.random_brightness(image, max_delta=24 / 255)
    image = tf.image.random_saturation(image, lower=0.8, upper=1.2)
    image = tf.image.random_hue(image, max_delta=0.02)  # stain colour carries class cues
    image = tf.image.random_contrast(image, lower=0.85, upper=1.15)
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([spec.size, spec.size, 3])
    return image * 2.0 - 1.0


class Preprocessor:
    """Runs eval (and, with a seed, training) preprocessing on NumPy images in its own graph."""

    def __init__(self, spec: PreprocessingSpec = SPEC, *, augment_seed: int | None = None) -> None:
        self.spec = spec
        self._graph = tf.Graph()
        with self._graph.as_default():
            if augment_seed is not None:
                seed_everything(augment_seed)
            self._input = tf1.placeholder(tf.uint8, [None, None, 3], name="rgb")
            self._eval = eval_image(self._input, spec)
            self._train: Any = (
                train_image(self._input, spec, seed=augment_seed + 1)
                if augment_seed is not None
                else None
            )
        self._session = new_session(self._graph)

    def eval(self, rgb: np.ndarray) -> np.ndarray:
        """float32 [S, S, 3] (no batch axis)."""
        return np.asarray(self._session.run(self._eval, {self._input: rgb}), dtype=np.float32)

    def augment(self, rgb: np.ndarray) -> np.ndarray:
        if self._train is None:
            raise RuntimeError("Preprocessor was made without augment_seed")
        return np.asarray(self._session.run(self._train, {self._input: rgb}), dtype=np.float32)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
