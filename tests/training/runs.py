"""Helpers the training tests share for reading what a trained run holds: its test split as
network inputs, its checkpoint's tensors, and a gate threshold that splits TensorFlow from
the deployed IR on one image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cellwatch.training import network
from cellwatch.training.evalgraph import FrozenGraph
from cellwatch.training.evaluate import batches
from cellwatch.training.ir import DEVICE_DEFAULT, CompiledIR, Precision
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.runinfo import FROZEN_FILE, load_run
from cellwatch.training.split import load_split
from cellwatch.training.tfcompat import tf1

Bundles = Callable[[Precision], Path]


def inputs_of(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """A run's test split, eval-preprocessed, and its labels."""
    split = load_split(Path(load_run(run).split_dir))
    entries = split.entries("test")
    with Preprocessor() as pre:
        x = np.concatenate(list(batches(split.root, entries, pre, "test")))
    return x, np.array([e.label for e in entries])


def gate_threshold(trained_run: Path, bundle: Bundles, x: np.ndarray) -> tuple[float, int]:
    """A threshold between TensorFlow's and the deployed fp16 IR's p(ALL) of one test image,
    so that image's decision differs between the two by construction."""
    p_dep = CompiledIR(bundle("fp16") / "model.xml", DEVICE_DEFAULT).predict(x)[:, 1]
    with FrozenGraph(trained_run / FROZEN_FILE) as frozen:
        p_tf = frozen.predict(x)[:, 1]
    i = int(np.argmax(np.abs(p_dep - p_tf)))
    assert p_dep[i] != p_tf[i], "the deployed IR reproduces TensorFlow exactly on this CPU"
    return float((p_dep[i] + p_tf[i]) / 2), i


def read_ckpt(prefix: Path) -> dict[str, np.ndarray]:
    reader = tf1.train.NewCheckpointReader(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def is_head(name: str) -> bool:
    return any(name.startswith(scope + "/") for scope in network.HEAD_SCOPES)
