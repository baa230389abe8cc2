"""The two training modes, each owning one TF1 graph and session.

Both build TF-Slim's Inception V3 with a 2-class head, initialise it from the seed,
restore everything but the head scopes from the base checkpoint (if any), and save
checkpoints of the whole network (model variables only, no optimizer slots), so
`evaluate` and `export` restore a run the same way whichever mode trained it.

- `BottleneckTrainer`: the base runs once per image in inference mode; its pooled
  features are cached on disk and only `InceptionV3/Logits/Conv2d_1c_1x1` trains
  (with the network's own dropout), on the cached features. Base weights never change.
- `FinetuneTrainer`: the chosen scopes train end to end on augmented images, with the
  network's dropout on; batch norm runs in training mode (batch statistics, moving
  averages updated) only inside the trainable scopes and only with
  `train_batch_norm`, so a frozen scope never changes, statistics included.

Both feed Adam a learning rate per epoch (`learning_rate`, FitConfig.lr_schedule),
and can snapshot and restore their trainable state (`snapshot`/`restore`) so that
`fit` can keep the epoch with the best validation loss.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.training import IMAGE_SIZE, network
from cellwatch.training.bottleneck import BottleneckCache, FeatureExtractor
from cellwatch.training.checkpoint import restore
from cellwatch.training.dataset import ImageEntry, load_rgb
from cellwatch.training.errors import TrainingError
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.progress import track
from cellwatch.training.runinfo import FitConfig
from cellwatch.training.split import SplitFile
from cellwatch.training.tfcompat import Tensor, new_session, seed_everything, tf, tf1

log = logging.getLogger(__name__)

EVAL_BATCH = 8
_DECODED_BUDGET_BYTES = 1 << 30
"""finetune keeps decoded training images in memory up to this many bytes."""


class Trainer(ABC):
    """Graph, session, restore and saving shared by both modes."""

    def __init__(self, config: FitConfig, split: SplitFile, checkpoint: Path | None) -> None:
        self.config = config
        self.split = split
        self.steps = 0
        self._assigners: dict[str, tuple[Any, Any]] = {}
        self.graph = tf.Graph()
        with self.graph.as_default():
            seed_everything(config.seed)
            self.labels = tf1.placeholder(tf.int64, [None], name="labels")
            self.images = tf1.placeholder(
                tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3], name="input"
            )
            self.lr = tf1.placeholder_with_default(
                tf.constant(config.learning_rate, tf.float32), [], name="learning_rate"
            )
            self._build()
            self.model_vars = network.model_variables(self.graph)  # before optimizer slots
            self.base_vars = network.not_in_scopes(self.model_vars, network.HEAD_SCOPES)
            self.state_vars = self.trainable + self._extra_state()
            self.train_op = tf1.train.AdamOptimizer(self.lr).minimize(
                self.loss, var_list=self.trainable
            )
            self.saver = tf1.train.Saver(
                var_list=self.model_vars, max_to_keep=2, save_relative_paths=True
            )
            init = tf1.global_variables_initializer()
        self.session = new_session(self.graph)
        try:
            self.session.run(init)
            if checkpoint is not None:
                with self.graph.as_default():
                    restore(self.session, checkpoint, self.model_vars, exclude=network.HEAD_SCOPES)
            else:
                log.warning(
                    "NO --checkpoint: the base network starts from RANDOM weights "
                    "(no ImageNet transfer learning)"
                )
            self.base_digest = network.weights_digest(self.session, self.base_vars)
        except BaseException:
            self.session.close()
            raise

    # -- to override -------------------------------------------------------------
    loss: Tensor
    trainable: list[Any]
    logits_for_eval: Tensor

    @abstractmethod
    def _build(self) -> None:
        """Build the graph: set loss, trainable and logits_for_eval."""

    def prepare(self, cache_root: Path | None) -> None:  # noqa: B027 (optional hook)
        """Load or compute what the epochs need (nothing by default)."""

    @abstractmethod
    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the training split; (mean loss, accuracy)."""

    @abstractmethod
    def validate(self) -> tuple[float, float] | None:
        """(loss, accuracy) on the validation split, or None if it is empty."""

    def _extra_state(self) -> list[Any]:
        """Variables besides the trainable ones that training changes (none by default)."""
        return []

    # -- shared ----------------------------------------------------------------
    def learning_rate(self, epoch: int) -> float:
        return self.config.learning_rate_at(epoch)

    def snapshot(self) -> list[np.ndarray]:
        """Values of the trainable state (to keep the best epoch)."""
        return [np.array(v) for v in self.session.run(self.state_vars)]

    def restore(self, values: list[np.ndarray]) -> None:
        for variable, value in zip(self.state_vars, values, strict=True):
            self.assign(variable, value)

    def _batches(self, n: int, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        size = self.config.batch_size
        return [order[s : s + size] for s in range(0, n, size)]

    def _loss_ops(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        xent = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=self.labels, logits=logits)
        )
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1), self.labels), tf.float32))
        return xent, correct

    def assign(self, variable: Any, value: np.ndarray) -> None:
        """Set a variable's value (one placeholder + assign op per variable, made once)."""
        name = network.variable_name(variable)
        if name not in self._assigners:
            with self.graph.as_default():
                holder = tf1.placeholder(variable.dtype.base_dtype, variable.shape)
                self._assigners[name] = (holder, variable.assign(holder))
        holder, op = self._assigners[name]
        self.session.run(op, {holder: np.asarray(value, dtype=np.float32)})

    def save(self, directory: Path, step: int | None = None) -> str:
        """Save a checkpoint of the whole network (named for step, default the steps run);
        returns its prefix relative to directory."""
        with self.graph.as_default():
            prefix = self.saver.save(
                self.session,
                str(directory / "model.ckpt"),
                global_step=self.steps if step is None else step,
                write_meta_graph=False,
            )
        return Path(prefix).name

    def close(self) -> None:
        self.session.close()


class BottleneckTrainer(Trainer):
    """Trains a linear head on standardised cached bottlenecks, folded into the network's head.

    Bottleneck dimensions differ in scale by orders of magnitude (and share a large
    common component when the base is randomly initialised), which makes plain
    gradient descent on the raw features crawl. So the head is trained on
    z = (f - mean) / std with the training split's statistics (dropout on z), and before
    every save it is folded exactly into `InceptionV3/Logits/Conv2d_1c_1x1`:
    weights W / std, biases b - (mean / std) W. The saved network is plain TF-Slim
    Inception V3; nothing extra is exported.
    """

    def _build(self) -> None:
        depth = self.config.depth_multiplier
        self.net = network.build(self.images, is_training=False, depth_multiplier=depth)
        dim = network.bottleneck_dim(depth)
        self.features = tf1.placeholder(tf.float32, [None, dim], name="bottlenecks")
        with tf1.variable_scope("BottleneckHead"):
            zeros = tf1.zeros_initializer()
            self.mean = tf1.get_variable("mean", [dim], initializer=zeros, trainable=False)
            self.inv_std = tf1.get_variable(
                "inv_std", [dim], initializer=tf1.ones_initializer(), trainable=False
            )
            self.weights = tf1.get_variable(
                "weights", [dim, network.NUM_CLASSES], initializer=zeros
            )
            self.biases = tf1.get_variable("biases", [network.NUM_CLASSES], initializer=zeros)
        self.trainable = [self.weights, self.biases]
        xent, self.correct = self._loss_ops(self._head(self.features, dropout=True))
        self.loss = xent + network.WEIGHT_DECAY * tf.nn.l2_loss(self.weights)
        self.logits_for_eval = self._head(self.features)
        self.eval_loss, self.eval_correct = self._loss_ops(self.logits_for_eval)
        self.train_x = self.val_x = np.zeros((0, dim), np.float32)

    def _head(self, features: Tensor, *, dropout: bool = False) -> Tensor:
        z = (features - self.mean) * self.inv_std
        if dropout:  # on z, not on f: zeroing a raw feature would move z by mean/std
            z = tf.nn.dropout(z, rate=1.0 - network.DROPOUT_KEEP_PROB)
        return tf.matmul(z, self.weights) + self.biases

    def prepare(self, cache_root: Path | None) -> None:
        dim = network.bottleneck_dim(self.config.depth_multiplier)
        self.cache = BottleneckCache(cache_root, self.base_digest, dim) if cache_root else None
        extractor = FeatureExtractor(self.session, self.images, self.net.prelogits, self.split.root)
        try:
            train, val = self.split.entries("train"), self.split.entries("val")
            self.train_x = extractor.features(train, self.cache, "train")
            self.train_y = np.array([e.label for e in train], np.int64)
            self.val_x = extractor.features(val, self.cache, "val")
            self.val_y = np.array([e.label for e in val], np.int64)
        finally:
            extractor.close()
        self.set_statistics(self.train_x)

    def set_statistics(self, x: np.ndarray) -> None:
        """Standardise with x's per-dimension mean and (floored) standard deviation."""
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        floor = 1e-2 * float(std.mean()) + 1e-6
        self.assign(self.mean, mean)
        self.assign(self.inv_std, 1.0 / np.sqrt(std**2 + floor**2))

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        return self.train_on(self.train_x, self.train_y, epoch)

    def train_on(self, x: np.ndarray, y: np.ndarray, epoch: int) -> tuple[float, float]:
        """One epoch of head training on the given bottlenecks (also used by the benchmark)."""
        total_loss, total_correct = 0.0, 0.0
        lr = self.learning_rate(epoch)
        for idx in self._batches(len(y), epoch):
            _, loss, correct = self.session.run(
                [self.train_op, self.loss, self.correct],
                {self.features: x[idx], self.labels: y[idx], self.lr: lr},
            )
            total_loss += float(loss) * len(idx)
            total_correct += float(correct)
            self.steps += 1
        return total_loss / len(y), total_correct / len(y)

    def validate(self) -> tuple[float, float] | None:
        if len(self.val_x) == 0:
            return None
        feed = {self.features: self.val_x, self.labels: self.val_y}
        loss, correct = self.session.run([self.eval_loss, self.eval_correct], feed)
        return float(loss), float(correct) / len(self.val_y)

    def save(self, directory: Path, step: int | None = None) -> str:
        self.fold_head()
        return super().save(directory, step)

    def fold_head(self) -> None:
        """Write the trained head into the network's final 1x1 convolution (exact)."""
        w, b, mean, inv_std = self.session.run([self.weights, self.biases, self.mean, self.inv_std])
        folded_w = (w * inv_std[:, None]).astype(np.float32)
        folded_b = (b - (mean * inv_std) @ w).astype(np.float32)
        head = {
            network.variable_name(v): v
            for v in network.in_scopes(self.model_vars, [network.HEAD_CONV_SCOPE])
        }
        conv_w = head[f"{network.HEAD_CONV_SCOPE}/weights"]
        self.assign(conv_w, folded_w.reshape(conv_w.shape.as_list()))
        self.assign(head[f"{network.HEAD_CONV_SCOPE}/biases"], folded_b)


class FinetuneTrainer(Trainer):
    def _build(self) -> None:
        cfg = self.config
        self.train_images = tf1.placeholder(
            tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3], name="train_input"
        )
        # dropout on (is_training); batch norm in training mode only in the trainable
        # scopes and only when asked: a frozen scope must not change, statistics included
        train_net = network.build(
            self.train_images,
            is_training=True,
            batch_norm_scopes=cfg.trainable_scopes if cfg.train_batch_norm else (),
            depth_multiplier=cfg.depth_multiplier,
        )
        eval_net = network.build(
            self.images, is_training=False, reuse=True, depth_multiplier=cfg.depth_multiplier
        )
        self.logits_for_eval = eval_net.logits
        self.trainable = network.in_scopes(tf1.trainable_variables(), cfg.trainable_scopes)
        if not self.trainable:
            raise TrainingError(
                f"--trainable-scopes {','.join(cfg.trainable_scopes)} match no variable of "
                "the network (scopes look like InceptionV3/Mixed_7c)"
            )
        if not network.covers(cfg.trainable_scopes, f"{network.HEAD_CONV_SCOPE}/weights"):
            raise TrainingError(
                f"--trainable-scopes must include {network.LOGITS_SCOPE}: the 2-class head is "
                "new and starts from random weights"
            )
        xent, self.correct = self._loss_ops(train_net.logits)
        loss = xent
        if train_net.aux_logits is not None and network.in_scopes(
            self.trainable, [network.AUX_LOGITS_SCOPE]
        ):
            aux, _ = self._loss_ops(train_net.aux_logits)
            loss = loss + network.AUX_LOSS_WEIGHT * aux
        self.loss = loss + network.weight_decay_loss(self.trainable)
        self.eval_loss, self.eval_correct = self._loss_ops(self.logits_for_eval)
        log.info(
            "finetune: training %d variables in %s",
            len(self.trainable),
            ", ".join(cfg.trainable_scopes),
        )

    def _extra_state(self) -> list[Any]:
        """Batch-norm moving statistics inside the trainable scopes (train_batch_norm)."""
        return [
            v
            for v in network.in_scopes(
                network.model_variables(self.graph), self.config.trainable_scopes
            )
            if "moving_" in network.variable_name(v)
        ]

    def prepare(self, cache_root: Path | None) -> None:
        self.pre = Preprocessor(augment_seed=self.config.seed)
        self.train = self.split.entries("train")
        self.val = self.split.entries("val")
        self._decoded: dict[str, np.ndarray] = {}
        self._decoded_bytes = 0
        self.val_inputs = [self.pre.eval(load_rgb(self.split.root, e)) for e in self.val]

    def _rgb(self, entry: ImageEntry) -> np.ndarray:
        hit = self._decoded.get(entry.sha256)
        if hit is not None:
            return hit
        rgb = load_rgb(self.split.root, entry)
        if self._decoded_bytes + rgb.nbytes <= _DECODED_BUDGET_BYTES:
            self._decoded[entry.sha256] = rgb
            self._decoded_bytes += rgb.nbytes
        return rgb

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        total_loss, total_correct = 0.0, 0.0
        for idx in track(self._batches(len(self.train), epoch), f"epoch {epoch}"):
            batch = [self.train[i] for i in idx]
            x = np.stack([self.pre.augment(self._rgb(e)) for e in batch])
            y = np.array([e.label for e in batch], np.int64)
            _, loss, correct = self.session.run(
                [self.train_op, self.loss, self.correct],
                {self.train_images: x, self.labels: y, self.lr: self.learning_rate(epoch)},
            )
            total_loss += float(loss) * len(idx)
            total_correct += float(correct)
            self.steps += 1
        return total_loss / len(self.train), total_correct / len(self.train)

    def validate(self) -> tuple[float, float] | None:
        if not self.val:
            return None
        total_loss, total_correct = 0.0, 0.0
        for s in range(0, len(self.val), EVAL_BATCH):
            x = np.stack(self.val_inputs[s : s + EVAL_BATCH])
            y = np.array([e.label for e in self.val[s : s + EVAL_BATCH]], np.int64)
            loss, correct = self.session.run(
                [self.eval_loss, self.eval_correct], {self.images: x, self.labels: y}
            )
            total_loss += float(loss) * len(y)
            total_correct += float(correct)
        return total_loss / len(self.val), total_correct / len(self.val)

    def close(self) -> None:
        if hasattr(self, "pre"):
            self.pre.close()
        super().close()
