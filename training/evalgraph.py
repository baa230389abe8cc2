"""The eval graph of a trained run: `input` -> Inception V3 (inference mode) -> `probabilities`.

One definition serves evaluation (any batch size) and export (batch 1, frozen with
`convert_variables_to_constants`), so the numbers in metrics.json come from the same
graph that becomes frozen.pb and the IR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.training import IMAGE_SIZE, network
from cellwatch.training.checkpoint import restore
from cellwatch.training.errors import ExportError
from cellwatch.training.tfcompat import new_session, seed_everything, tf, tf1

FROZEN_INPUT_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE, 3)


class EvalGraph:
    """A restored eval graph; `batch` fixes the input's batch size (None: any);
    depth_multiplier: the run's (FitConfig.depth_multiplier)."""

    def __init__(
        self, checkpoint: Path, *, batch: int | None = None, depth_multiplier: float = 1.0
    ) -> None:
        self.graph = tf.Graph()
        with self.graph.as_default():
            seed_everything(0)  # deterministic kernels need seeded initialisers, even if restored
            self.input = tf1.placeholder(
                tf.float32,
                [batch, IMAGE_SIZE, IMAGE_SIZE, 3],
                name=network.INPUT_NAME,
            )
            net = network.build(self.input, is_training=False, depth_multiplier=depth_multiplier)
            self.logits = net.logits
            self.output = tf.identity(net.probabilities, name=network.OUTPUT_NAME)
            variables = network.model_variables(self.graph)
            self._head = network.in_scopes(variables, [network.HEAD_CONV_SCOPE])
        self.session = new_session(self.graph)
        try:
            with self.graph.as_default():
                restore(self.session, checkpoint, variables)
        except BaseException:
            self.session.close()
            raise

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for preprocessed inputs [N, 299, 299, 3]."""
        return np.asarray(self.session.run(self.output, {self.input: inputs}), dtype=np.float32)

    def predict_logits(self, inputs: np.ndarray) -> np.ndarray:
        """Pre-softmax logits [N, classes] for preprocessed inputs [N, 299, 299, 3]."""
        return np.asarray(self.session.run(self.logits, {self.input: inputs}), dtype=np.float32)

    def scale_logits(self, factor: float) -> None:
        """Multiply the logits by factor, exactly, by scaling the final 1x1 convolution's
        weights and biases (nothing follows it but the softmax): how a calibration
        temperature T is folded in (factor 1/T) before freezing."""
        with self.graph.as_default():
            for variable in self._head:
                value = np.asarray(self.session.run(variable) * factor, dtype=np.float32)
                holder = tf1.placeholder(tf.float32, variable.shape)
                self.session.run(variable.assign(holder), {holder: value})

    def freeze(self) -> Any:
        """GraphDef with variables turned into constants, pruned to the softmax output."""
        try:
            return tf1.graph_util.convert_variables_to_constants(
                self.session, self.graph.as_graph_def(), [network.OUTPUT_NAME]
            )
        except (tf.errors.OpError, ValueError) as exc:
            raise ExportError(f"freezing the eval graph failed: {exc}") from exc

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> EvalGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrozenGraph:
    """frozen.pb run by TensorFlow (the original workflow's runtime), for parity checks."""

    def __init__(self, path: Path) -> None:
        graph_def = tf1.GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot read frozen graph {path}: {exc}") from exc
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf1.import_graph_def(graph_def, name="")
        self.input = self.graph.get_tensor_by_name(f"{network.INPUT_NAME}:0")
        self.output = self.graph.get_tensor_by_name(f"{network.OUTPUT_NAME}:0")
        self.session = new_session(self.graph)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Probabilities for inputs [N, 299, 299, 3], one at a time (the graph has batch 1)."""
        return (
            np.concatenate(
                [
                    np.asarray(
                        self.session.run(self.output, {self.input: x[np.newaxis]}), np.float32
                    )
                    for x in inputs
                ]
            )
            if len(inputs)
            else np.zeros((0, network.NUM_CLASSES), np.float32)
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> FrozenGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
