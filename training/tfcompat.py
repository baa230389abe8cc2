"""TensorFlow and TF-Slim, adapted to current TensorFlow. Import them from here only.

tf-slim 1.1.0 (2020) is the last release; on TensorFlow >= 2.14 it needs two
adaptations, both kept in this module (tests/training/test_tfcompat.py checks them):

1. `tensorflow.python.framework.ops.Tensor` no longer exists (the class is
   `tf.Tensor` now); tf_slim tests `isinstance(x, ops.Tensor)` in several places
   (layers/utils.py, layers/optimizers.py, learning.py). We alias it *before*
   tf_slim is imported.
2. `slim.batch_norm` with the default `updates_collections=tf.GraphKeys.UPDATE_OPS`
   builds a Keras v1 `BatchNormalization` layer that current TensorFlow no longer
   supports; any other value makes it take its fused path (`FusedBatchNormV3`).
   `BATCH_NORM_UPDATES = None` is that value: moving statistics are updated in place
   during a training-mode forward pass, so no UPDATE_OPS need to be run.
   `network.arg_scope()` always passes it.

Also here, because it must happen before TensorFlow initialises: quiet C++ logging,
deterministic kernels (`TF_DETERMINISTIC_OPS=1`), and a session config whose thread
pools match the CPUs this process may use. TensorFlow's native libraries print
notices (oneDNN, "no CUDA drivers", a failed cuInit) straight to file descriptor 2
before its log level applies; unless TF_CPP_MIN_LOG_LEVEL is set below 2, fd 2 is
pointed at /dev/null while TensorFlow is imported and the first session starts, so a
CLI error stays one line. Python exceptions are unaffected; set
TF_CPP_MIN_LOG_LEVEL=0 to see everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import warnings
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no INFO/WARNING banners from C++
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import numpy as np


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") < "2":
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


with _native_stderr_silenced():
    import tensorflow as tf
    from tensorflow.python.framework import ops as _tf_ops

if not hasattr(_tf_ops, "Tensor"):  # adaptation 1 (TensorFlow >= 2.14)
    _tf_ops.Tensor = tf.Tensor

# tf_slim's layers call the deprecated `layer.apply`; the warning is TF-Slim's, not ours.
warnings.filterwarnings("ignore", message=r"`layer\.apply` is deprecated", category=UserWarning)

import tf_slim as slim  # noqa: E402
from tf_slim.nets import inception_v3  # noqa: E402

tf.get_logger().setLevel(logging.ERROR)  # TF1 deprecation notices from compat.v1 calls

tf1: Any = tf.compat.v1

BATCH_NORM_UPDATES: None = None
"""Adaptation 2: `updates_collections` for slim.batch_norm (fused path, in-place updates)."""

Tensor = Any
"""TensorFlow has no type stubs; tensors and graphs are typed as Any."""

__all__ = [
    "BATCH_NORM_UPDATES",
    "Tensor",
    "inception_v3",
    "new_session",
    "seed_everything",
    "slim",
    "tf",
    "tf1",
    "versions",
]


def cpu_threads() -> int:
    """CPUs this process may run on (affinity-aware; at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_config() -> Any:
    """A ConfigProto that uses this machine's CPUs without oversubscribing them."""
    threads = cpu_threads()
    return tf1.ConfigProto(
        intra_op_parallelism_threads=threads,
        inter_op_parallelism_threads=1 if threads <= 2 else 2,
        allow_soft_placement=True,
    )


_first_session = True


def new_session(graph: Any) -> Any:
    """A tf.compat.v1 Session on graph with `session_config()`."""
    global _first_session
    if _first_session:  # device discovery prints its notices on the first one
        with _native_stderr_silenced():
            session = tf1.Session(graph=graph, config=session_config())
        _first_session = False
        return session
    return tf1.Session(graph=graph, config=session_config())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the current default graph's TensorFlow seed.

    Call inside `with graph.as_default():` before building ops, so every random op
    gets a deterministic op seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    tf1.set_random_seed(seed)


def versions() -> dict[str, str]:
    """Versions of the libraries a trained model depends on (for provenance)."""
    import platform
    from importlib import metadata

    found = {"python": platform.python_version(), "tensorflow": str(tf.__version__)}
    for dist in ("tf-slim", "numpy", "openvino", "nncf", "opencv-python-headless", "cellwatch"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found
