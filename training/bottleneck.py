"""Bottleneck features: the frozen base network's pooled 2048-vector, computed once per image.

The cache is keyed by what determines a bottleneck: the image bytes (SHA-256), the
exact base weights (`network.weights_digest` of the restored network, which names
the checkpoint, or the seed of a random initialisation), the eval preprocessing
(its spec), and the versions of the code that turns bytes into features: the
decoder's libraries (OpenCV, Pillow), TensorFlow (preprocessing and the forward
pass) and NumPy (`cache_key`). Files are `CACHE/<key>/<sha[:2]>/<sha>.npy` (plain
float32 arrays, loaded with allow_pickle=False); a damaged file is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.training import IMAGE_SIZE
from cellwatch.training.dataset import ImageEntry, load_rgb
from cellwatch.training.network import BOTTLENECK_DIM
from cellwatch.training.preprocess import SPEC, Preprocessor
from cellwatch.training.progress import track

log = logging.getLogger(__name__)

CACHE_VERSION = 2
FEATURE_BATCH = 8
KEY_LIBRARIES = ("tensorflow", "opencv-python-headless", "pillow", "numpy")
"""Libraries whose versions are part of the key: decoder, preprocessing, forward pass."""


def library_versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in KEY_LIBRARIES:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "absent"
    return found


def cache_key(base_digest: str, libraries: dict[str, str] | None = None) -> str:
    """The cache directory name for one base network and this software."""
    libs = library_versions() if libraries is None else libraries
    text = "\n".join(
        [
            f"v{CACHE_VERSION}",
            base_digest,
            SPEC.model_dump_json(),
            *(f"{name}={libs[name]}" for name in sorted(libs)),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class BottleneckCache:
    """Bottleneck vectors on disk for one base network."""

    def __init__(self, root: Path, base_digest: str, dim: int = BOTTLENECK_DIM) -> None:
        self.dir = root / cache_key(base_digest)
        self.dim = dim
        self.hits = 0
        self.misses = 0

    def _path(self, image_sha256: str) -> Path:
        return self.dir / image_sha256[:2] / f"{image_sha256}.npy"

    def get(self, image_sha256: str) -> np.ndarray | None:
        path = self._path(image_sha256)
        if not path.is_file():
            return None
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("recomputing damaged bottleneck %s: %s", path, exc)
            return None
        if value.shape != (self.dim,) or value.dtype != np.float32:
            log.warning("recomputing bottleneck %s with unexpected shape %s", path, value.shape)
            return None
        return np.asarray(value)

    def put(self, image_sha256: str, value: np.ndarray) -> None:
        path = self._path(image_sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, np.asarray(value, dtype=np.float32), allow_pickle=False)
        tmp.replace(path)


class FeatureExtractor:
    """Computes bottlenecks with a live session of the network (eval preprocessing)."""

    def __init__(self, session: Any, images: Any, prelogits: Any, root: Path) -> None:
        self._session = session
        self._images = images
        self._prelogits = prelogits
        self._root = root
        self._pre = Preprocessor()
        self.dim = int(prelogits.shape[-1])
        """2048 for the full-width network (fewer at a smaller depth multiplier)."""

    def compute(self, entries: Sequence[ImageEntry]) -> np.ndarray:
        """[N, 2048] float32, forward pass for every entry (no cache)."""
        out = np.empty((len(entries), self.dim), np.float32)
        for start in range(0, len(entries), FEATURE_BATCH):
            batch = entries[start : start + FEATURE_BATCH]
            inputs = np.stack([self._pre.eval(load_rgb(self._root, e)) for e in batch])
            feats = self._session.run(self._prelogits, {self._images: inputs})
            out[start : start + len(batch)] = np.reshape(feats, (len(batch), self.dim))
        return out

    def features(
        self, entries: Sequence[ImageEntry], cache: BottleneckCache | None, what: str = "images"
    ) -> np.ndarray:
        """[N, 2048]: from the cache where present, computed (and cached) otherwise."""
        out = np.empty((len(entries), self.dim), np.float32)
        todo: list[int] = []
        for i, entry in enumerate(entries):
            hit = cache.get(entry.sha256) if cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        if cache is not None:
            cache.hits += len(entries) - len(todo)
            cache.misses += len(todo)
        batches = [todo[s : s + FEATURE_BATCH] for s in range(0, len(todo), FEATURE_BATCH)]
        for batch in track(batches, f"bottlenecks ({what})"):
            values = self.compute([entries[i] for i in batch])
            for i, value in zip(batch, values, strict=True):
                out[i] = value
                if cache is not None:
                    cache.put(entries[i].sha256, value)
        log.info(
            "bottlenecks for %d %s: %d cached, %d computed",
            len(entries),
            what,
            len(entries) - len(todo),
            len(todo),
        )
        return out

    def close(self) -> None:
        self._pre.close()


def base_features(
    root: Path,
    entries: Sequence[ImageEntry],
    checkpoint: Path,
    depth_multiplier: float,
    cache_root: Path,
) -> np.ndarray:
    """[N, dim] bottlenecks of entries by the base network restored from checkpoint (head
    scopes left out), through the cache `fit` uses in bottleneck mode: same key (the
    restored base weights' digest), so `prepare --checkpoint` computes what `fit` reuses."""
    from cellwatch.training import network
    from cellwatch.training.checkpoint import resolve, restore
    from cellwatch.training.tfcompat import new_session, seed_everything, tf, tf1

    prefix = resolve(checkpoint)
    graph = tf.Graph()
    with graph.as_default():
        seed_everything(0)
        images = tf1.placeholder(tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3], name="input")
        net = network.build(images, is_training=False, depth_multiplier=depth_multiplier)
        variables = network.model_variables(graph)
        init = tf1.global_variables_initializer()
    session = new_session(graph)
    try:
        session.run(init)
        with graph.as_default():
            restore(session, prefix, variables, exclude=network.HEAD_SCOPES)
        digest = network.weights_digest(
            session, network.not_in_scopes(variables, network.HEAD_SCOPES)
        )
        cache = BottleneckCache(cache_root, digest, network.bottleneck_dim(depth_multiplier))
        extractor = FeatureExtractor(session, images, net.prelogits, root)
        try:
            return extractor.features(entries, cache, "near-duplicate check")
        finally:
            extractor.close()
    finally:
        session.close()
