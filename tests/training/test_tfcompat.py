"""The two tf-slim 1.1.0 adaptations in `tfcompat` (see its docstring) work on this TensorFlow."""

from __future__ import annotations

import numpy as np

from cellwatch.training import tfcompat
from cellwatch.training.tfcompat import BATCH_NORM_UPDATES, slim, tf, tf1


def test_ops_tensor_is_aliased_to_tf_tensor() -> None:
    from tensorflow.python.framework import ops

    assert ops.Tensor is tf.Tensor
    assert tf.__version__.split(".")[0] == "2"


def test_batch_norm_takes_the_fused_path_and_updates_in_place() -> None:
    """With updates_collections=None slim.batch_norm builds FusedBatchNormV3 and a training
    forward pass moves the moving mean by itself (no UPDATE_OPS to run)."""
    assert BATCH_NORM_UPDATES is None
    graph = tf.Graph()
    with graph.as_default():
        tfcompat.seed_everything(0)
        x = tf1.placeholder(tf.float32, [4, 8, 8, 3])
        y = slim.batch_norm(
            x, is_training=True, updates_collections=BATCH_NORM_UPDATES, decay=0.5, scope="bn"
        )
        (moving_mean,) = [v for v in tf1.global_variables() if "moving_mean" in v.name]
        init = tf1.global_variables_initializer()
        assert not tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
    op_types = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in op_types
    with tfcompat.new_session(graph) as session:
        session.run(init)
        session.run(y, {x: np.full((4, 8, 8, 3), 2.0, np.float32)})
        np.testing.assert_allclose(session.run(moving_mean), [1.0, 1.0, 1.0], rtol=1e-6)


def test_session_config_matches_cpus() -> None:
    config = tfcompat.session_config()
    assert config.intra_op_parallelism_threads == tfcompat.cpu_threads() >= 1


def test_versions_name_the_libraries() -> None:
    found = tfcompat.versions()
    assert found["tensorflow"] == tf.__version__
    assert found["tf-slim"] == "1.1.0"
