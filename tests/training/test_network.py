"""The network is TF-Slim's Inception V3 exactly as the public checkpoint stores it, and
checkpoints restore (or are refused) as they should."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cellwatch.training import checkpoint, network
from cellwatch.training.checkpoint import write_random_base
from cellwatch.training.errors import CheckpointError
from cellwatch.training.tfcompat import new_session, seed_everything, tf, tf1

pytestmark = pytest.mark.slow

# Names and shapes from the public inception_v3_2016_08_28 checkpoint.
PUBLIC_SHAPES = {
    "InceptionV3/Conv2d_1a_3x3/weights": (3, 3, 3, 32),
    "InceptionV3/Conv2d_1a_3x3/BatchNorm/beta": (32,),
    "InceptionV3/Conv2d_1a_3x3/BatchNorm/moving_mean": (32,),
    "InceptionV3/Conv2d_1a_3x3/BatchNorm/moving_variance": (32,),
    "InceptionV3/Mixed_5b/Branch_1/Conv2d_0b_5x5/weights": (5, 5, 48, 64),
    "InceptionV3/Mixed_6e/Branch_2/Conv2d_0e_1x7/weights": (1, 7, 192, 192),
    "InceptionV3/Mixed_7c/Branch_3/Conv2d_0b_1x1/weights": (1, 1, 2048, 192),
    "InceptionV3/AuxLogits/Conv2d_2a_5x5/weights": (5, 5, 128, 768),
    "InceptionV3/AuxLogits/Conv2d_2b_1x1/weights": (1, 1, 768, 1001),
    "InceptionV3/AuxLogits/Conv2d_2b_1x1/biases": (1001,),
    "InceptionV3/Logits/Conv2d_1c_1x1/weights": (1, 1, 2048, 1001),
    "InceptionV3/Logits/Conv2d_1c_1x1/biases": (1001,),
}


def _graph(num_classes: int) -> tuple[Any, list[Any]]:
    graph = tf.Graph()
    with graph.as_default():
        seed_everything(0)
        images = tf1.placeholder(tf.float32, [1, 299, 299, 3])
        network.build(images, num_classes=num_classes, is_training=False)
    return graph, network.model_variables(graph)


def test_variables_match_the_public_checkpoint() -> None:
    graph, variables = _graph(1001)
    shapes = {network.variable_name(v): tuple(v.shape.as_list()) for v in variables}
    assert len(shapes) == 388
    assert sum(int(np.prod(s)) for s in shapes.values()) == 27_182_194
    for name, shape in PUBLIC_SHAPES.items():
        assert shapes[name] == shape, name
    assert not [n for n in shapes if n.endswith("/gamma")]  # Inception V3 BN has no scale
    with graph.as_default():
        assert len(tf1.global_variables()) == 388


def test_two_class_head_differs_only_in_head_scopes() -> None:
    _, big = _graph(1001)
    _, small = _graph(2)
    big_shapes = {network.variable_name(v): tuple(v.shape.as_list()) for v in big}
    small_shapes = {network.variable_name(v): tuple(v.shape.as_list()) for v in small}
    assert big_shapes.keys() == small_shapes.keys()
    differing = {n for n in big_shapes if big_shapes[n] != small_shapes[n]}
    assert differing == {
        "InceptionV3/Logits/Conv2d_1c_1x1/weights",
        "InceptionV3/Logits/Conv2d_1c_1x1/biases",
        "InceptionV3/AuxLogits/Conv2d_2b_1x1/weights",
        "InceptionV3/AuxLogits/Conv2d_2b_1x1/biases",
    }
    assert small_shapes["InceptionV3/Logits/Conv2d_1c_1x1/weights"] == (1, 1, 2048, 2)


@pytest.fixture(scope="module")
def full_width_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-width (depth multiplier 1.0) 1001-class checkpoint: the public file's 388
    variables with their names and shapes (the other tests use TEST_DEPTH's)."""
    return write_random_base(tmp_path_factory.mktemp("full") / "inception_v3.ckpt", 1, 1.0)


def test_imagenet_checkpoint_restores_into_two_class_net(full_width_ckpt: Path) -> None:
    imagenet_ckpt = full_width_ckpt
    graph, variables = _graph(2)
    with graph.as_default():
        init = tf1.global_variables_initializer()
    session = new_session(graph)
    session.run(init)
    with graph.as_default():
        restored = checkpoint.restore(session, imagenet_ckpt, variables, network.HEAD_SCOPES)
    assert restored == 388 - 12  # everything but Logits (2) and AuxLogits (10)
    reader = tf1.train.NewCheckpointReader(str(imagenet_ckpt))
    base = network.not_in_scopes(variables, network.HEAD_SCOPES)
    for var, value in zip(base, session.run(base), strict=True):
        np.testing.assert_array_equal(value, reader.get_tensor(network.variable_name(var)))
    session.close()


def test_restoring_the_head_of_another_class_count_is_refused(full_width_ckpt: Path) -> None:
    _, variables = _graph(2)
    with pytest.raises(CheckpointError, match=r"does not match the network.*shape"):
        checkpoint.restorable(full_width_ckpt, variables, exclude=())


def test_a_base_of_another_width_is_refused(imagenet_ckpt: Path) -> None:
    """The tests' base is TEST_DEPTH wide: it does not restore into the full network."""
    _, variables = _graph(2)
    with pytest.raises(CheckpointError, match="saved at the run's --depth-multiplier"):
        checkpoint.restorable(imagenet_ckpt, variables, exclude=network.HEAD_SCOPES)


def test_missing_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.resolve(tmp_path / "inception_v3.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint" * 100)
    _, variables = _graph(2)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.restorable(checkpoint.resolve(junk), variables)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.resolve(tmp_path)

    other = tf.Graph()
    with other.as_default():
        seed_everything(0)
        tfvar = tf1.get_variable("resnet/conv1/weights", [3, 3, 3, 8])
        saver = tf1.train.Saver([tfvar])
        init = tf1.global_variables_initializer()
    with new_session(other) as session:
        session.run(init)
        with other.as_default():
            prefix = saver.save(session, str(tmp_path / "resnet.ckpt"), write_meta_graph=False)
    assert checkpoint.resolve(tmp_path) == Path(prefix)
    with pytest.raises(CheckpointError, match="not a TF-Slim Inception V3 checkpoint"):
        checkpoint.restorable(Path(prefix), variables)


def test_checkpoint_sha256_of_a_v1_file_is_the_file_hash(imagenet_ckpt: Path) -> None:
    import hashlib

    assert checkpoint.files(imagenet_ckpt) == [imagenet_ckpt]
    digest = hashlib.sha256(imagenet_ckpt.read_bytes()).hexdigest()
    assert checkpoint.sha256(imagenet_ckpt) == digest
