"""The network: TF-Slim's own Inception V3 (`tf_slim.nets.inception_v3`) with a 2-class head.

We do not write the network again: variable scopes and names are those of the
public ImageNet checkpoint `inception_v3.ckpt` (1001 classes), so that checkpoint
restores into this graph with only the class-dependent head scopes
(`InceptionV3/Logits`, `InceptionV3/AuxLogits`) left out.

Graphs are TF1-style (tf.compat.v1), which is what tf-slim needs; build them inside
`with graph.as_default():`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellwatch.training import IMAGE_SIZE, LABELS
from cellwatch.training.tfcompat import BATCH_NORM_UPDATES, Tensor, inception_v3, slim, tf, tf1

if inception_v3.inception_v3.default_image_size != IMAGE_SIZE:  # pragma: no cover
    raise ImportError("tf_slim's Inception V3 input size differs from the bundle contract's")
NUM_CLASSES = len(LABELS)
SCOPE = "InceptionV3"
LOGITS_SCOPE = "InceptionV3/Logits"
AUX_LOGITS_SCOPE = "InceptionV3/AuxLogits"
HEAD_SCOPES: tuple[str, ...] = (LOGITS_SCOPE, AUX_LOGITS_SCOPE)
"""Scopes whose shapes depend on the class count: never restored from a base checkpoint."""
HEAD_CONV_SCOPE = "InceptionV3/Logits/Conv2d_1c_1x1"
"""The final 1x1 convolution (2048 -> classes): the only layer bottleneck mode trains."""
BOTTLENECK_DIM = 2048
"""The pooled feature size of the full-width network (depth_multiplier 1.0)."""
FULL_WIDTH = 1.0
MIN_DEPTH = 16
"""TF-Slim's min_depth: no layer narrower than this, whatever the depth multiplier."""
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
"""Graph names of the exported model's input and softmax output (frozen.pb and the IR)."""
WEIGHT_DECAY = 4e-5
DROPOUT_KEEP_PROB = 0.8
AUX_LOSS_WEIGHT = 0.4
"""TF-Slim's weight for the auxiliary head's loss (train_image_classifier.py)."""


@dataclass(frozen=True)
class Net:
    """Tensors of one Inception V3 tower."""

    logits: Tensor
    """[B, classes] pre-softmax scores."""
    probabilities: Tensor
    """[B, classes] softmax."""
    prelogits: Tensor
    """[B, 1, 1, 2048] pooled features (after dropout when training): the bottleneck."""
    aux_logits: Tensor | None
    end_points: dict[str, Tensor]


def arg_scope(weight_decay: float = WEIGHT_DECAY) -> Any:
    """TF-Slim's Inception V3 arg scope with the fused batch norm (see tfcompat)."""
    return inception_v3.inception_v3_arg_scope(
        weight_decay=weight_decay, updates_collections=BATCH_NORM_UPDATES
    )


def build(
    images: Tensor,
    *,
    num_classes: int = NUM_CLASSES,
    is_training: bool = False,
    reuse: bool | None = None,
    create_aux_logits: bool = True,
    batch_norm_scopes: Sequence[str] | None = None,
    depth_multiplier: float = FULL_WIDTH,
) -> Net:
    """Inception V3 on images ([B, 299, 299, 3] float in [-1, 1]) in the current graph.

    is_training switches dropout and (TF-Slim's behaviour) every batch norm to
    training mode. With batch_norm_scopes given, batch norm is in training mode (batch
    statistics, moving averages updated in place) only inside those scopes and in
    inference mode everywhere else, while dropout still follows is_training: that is
    how fine-tuning keeps frozen scopes frozen, statistics included.

    depth_multiplier is TF-Slim's own: every layer's channels times it (at least
    MIN_DEPTH). 1.0 is the published network; smaller ones are the same architecture,
    narrower, for tests and benchmarks that need a real Inception V3 but not its cost.
    A base checkpoint must have been saved at the same multiplier (shapes differ).
    """
    with slim.arg_scope(arg_scope()), _scoped_batch_norm(is_training, batch_norm_scopes):
        logits, end_points = inception_v3.inception_v3(
            images,
            num_classes=num_classes,
            is_training=is_training,
            dropout_keep_prob=DROPOUT_KEEP_PROB,
            reuse=reuse,
            create_aux_logits=create_aux_logits,
            min_depth=MIN_DEPTH,
            depth_multiplier=depth_multiplier,
            scope=SCOPE,
        )
    return Net(
        logits=logits,
        probabilities=end_points["Predictions"],
        prelogits=end_points["PreLogits"],
        aux_logits=end_points.get("AuxLogits"),
        end_points=dict(end_points),
    )


def bottleneck_dim(depth_multiplier: float = FULL_WIDTH) -> int:
    """The pooled feature size (Mixed_7c's channels) at a depth multiplier: 2048 at 1.0."""

    def depth(d: int) -> int:
        return max(int(d * depth_multiplier), MIN_DEPTH)

    return depth(320) + 4 * depth(384) + depth(192)


def _scoped_batch_norm(is_training: bool, scopes: Sequence[str] | None) -> Any:
    """An arg scope whose conv2d normaliser runs batch norm in training mode only in scopes.

    conv2d calls its normalizer_fn inside the layer's variable scope, so the scope
    name tells the wrapper where it is; its explicit is_training overrides the one
    TF-Slim's inception_v3 sets for every batch norm.
    """
    if scopes is None:
        return contextlib.nullcontext()
    chosen = tuple(scopes)

    def batch_norm(inputs: Tensor, **kwargs: Any) -> Tensor:
        here = tf1.get_variable_scope().name
        kwargs["is_training"] = is_training and any(
            here == s or here.startswith(s.rstrip("/") + "/") for s in chosen
        )
        return slim.batch_norm(inputs, **kwargs)

    return slim.arg_scope([slim.conv2d], normalizer_fn=batch_norm)


def covers(scopes: Sequence[str], name: str) -> bool:
    """Whether the variable (or scope) name lies in one of scopes."""
    return any(name == s or name.startswith(s.rstrip("/") + "/") for s in scopes)


def weight_decay_loss(variables: Iterable[Any], weight_decay: float = WEIGHT_DECAY) -> Tensor:
    """slim's l2_regularizer (wd * sum(w^2) / 2) over the `weights` among variables."""
    terms = [tf.nn.l2_loss(v) for v in variables if v.op.name.endswith("/weights")]
    if not terms:
        return tf.constant(0.0)
    return weight_decay * tf.add_n(terms)


def model_variables(graph: Any | None = None) -> list[Any]:
    """All global variables of the network (weights, biases, batch-norm statistics)."""
    g = graph if graph is not None else tf1.get_default_graph()
    return [v for v in g.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES) if _in(v, (SCOPE,))]


def in_scopes(variables: Iterable[Any], scopes: Sequence[str]) -> list[Any]:
    return [v for v in variables if _in(v, scopes)]


def not_in_scopes(variables: Iterable[Any], scopes: Sequence[str]) -> list[Any]:
    return [v for v in variables if not _in(v, scopes)]


def variable_name(variable: Any) -> str:
    """Name as a checkpoint stores it (no `:0`)."""
    return str(variable.op.name)


def _in(variable: Any, scopes: Sequence[str]) -> bool:
    return covers(scopes, variable_name(variable))


def weights_digest(session: Any, variables: Sequence[Any]) -> str:
    """SHA-256 over the names, shapes and values of variables as they are in session.

    Identifies the exact base network a bottleneck was computed with, whichever
    checkpoint file (or random initialisation) the weights came from.
    """
    ordered = sorted(variables, key=variable_name)
    values = session.run(ordered)
    digest = hashlib.sha256()
    for var, value in zip(ordered, values, strict=True):
        arr = np.ascontiguousarray(value, dtype=np.float32)
        digest.update(f"{variable_name(var)}:{arr.shape}\n".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()
