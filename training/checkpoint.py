"""Checkpoint files: finding, hashing, checking against the network, restoring.

Accepts the public TF-Slim `inception_v3.ckpt` (one V1-format file), a V2 prefix
(`model.ckpt-120` with `.index` and `.data-*` beside it) or a directory (its latest
checkpoint). Before anything is restored, every variable we want from it is checked
for presence and shape, so a wrong file gives one clear CheckpointError instead of a
TensorFlow traceback halfway through a run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellwatch.training.errors import CheckpointError
from cellwatch.training.network import SCOPE, not_in_scopes, variable_name
from cellwatch.training.tfcompat import tf, tf1

log = logging.getLogger(__name__)

_HASH_BLOCK = 4 * 1024 * 1024


def resolve(path: Path) -> Path:
    """The path prefix a Saver restores from; CheckpointError if there is none."""
    if path.is_dir():
        latest = tf.train.latest_checkpoint(str(path))
        if latest is None:
            raise CheckpointError(f"checkpoint directory {path} holds no checkpoint")
        return Path(latest)
    if path.suffix == ".index" or ".data-" in path.name:
        path = path.with_name(path.name.split(".index")[0].split(".data-")[0])
    if path.is_file() or Path(f"{path}.index").is_file():
        return path
    raise CheckpointError(f"checkpoint {path} does not exist")


def files(prefix: Path) -> list[Path]:
    """The files that make up the checkpoint at prefix (V1: one file; V2: index + shards)."""
    if prefix.is_file():
        return [prefix]
    index = Path(f"{prefix}.index")
    shards = sorted(prefix.parent.glob(f"{prefix.name}.data-*"))
    if not index.is_file() or not shards:
        raise CheckpointError(f"checkpoint {prefix} is incomplete (index or data files missing)")
    return [index, *shards]


def sha256(prefix: Path) -> str:
    """SHA-256 of the checkpoint's bytes: the file's own hash for a V1 `inception_v3.ckpt`,
    otherwise over the index then the data shards in order."""
    digest = hashlib.sha256()
    for part in files(prefix):
        with part.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def shapes(prefix: Path) -> dict[str, tuple[int, ...]]:
    """Variable name -> shape, as stored in the checkpoint."""
    try:
        reader = tf1.train.NewCheckpointReader(str(prefix))
    except (tf.errors.OpError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {prefix}: {_first_line(exc)}") from exc
    return {
        name: tuple(int(d) for d in shape)
        for name, shape in reader.get_variable_to_shape_map().items()
    }


def restorable(
    prefix: Path, variables: Sequence[Any], exclude: Sequence[str] = ()
) -> dict[str, Any]:
    """Checkpoint name -> variable for every variable outside exclude.

    CheckpointError when the checkpoint lacks any of them or stores another shape
    (a different network, or a head with another class count that was not excluded).
    """
    stored = shapes(prefix)
    if not any(name.startswith(SCOPE + "/") for name in stored):
        raise CheckpointError(
            f"{prefix} is not a TF-Slim Inception V3 checkpoint (no {SCOPE}/ variables)"
        )
    wanted = not_in_scopes(variables, exclude)
    missing = [variable_name(v) for v in wanted if variable_name(v) not in stored]
    mismatched = [
        f"{variable_name(v)} {tuple(stored[variable_name(v)])} != {tuple(v.shape.as_list())}"
        for v in wanted
        if variable_name(v) in stored
        and tuple(stored[variable_name(v)]) != tuple(v.shape.as_list())
    ]
    if missing or mismatched:
        problems = [f"missing {n}" for n in missing[:3]] + [f"shape {m}" for m in mismatched[:3]]
        raise CheckpointError(
            f"checkpoint {prefix} does not match the network: {len(missing)} variables missing, "
            f"{len(mismatched)} with other shapes (e.g. {'; '.join(problems)})"
            + (
                "; a base checkpoint must be saved at the run's --depth-multiplier"
                if mismatched
                else ""
            )
        )
    return {variable_name(v): v for v in wanted}


def restore(
    session: Any, prefix: Path, variables: Sequence[Any], exclude: Sequence[str] = ()
) -> int:
    """Restore variables outside exclude from prefix; returns how many were restored."""
    var_map = restorable(prefix, variables, exclude)
    saver = tf1.train.Saver(var_list=var_map, name="restore_base")
    try:
        saver.restore(session, str(prefix))
    except tf.errors.OpError as exc:
        raise CheckpointError(f"restoring {prefix} failed: {_first_line(exc)}") from exc
    log.info(
        "restored %d variables from %s (excluded %s)",
        len(var_map),
        prefix,
        ", ".join(exclude) or "none",
    )
    return len(var_map)


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


def write_random_base(path: Path, seed: int = 1, depth_multiplier: float = 1.0) -> Path:
    """A 1001-class TF-Slim Inception V3 checkpoint with random weights, in the public
    `inception_v3.ckpt`'s V1 single-file format and variable names (at depth_multiplier
    1.0 also its shapes; a narrower one restores only into runs of that multiplier).

    For tests and benchmarks that need "a checkpoint" without downloading one: it
    restores exactly like the ImageNet file, but its features are random, so models
    built on it measure the pipeline, not transfer learning.
    """
    from cellwatch.training import network
    from cellwatch.training.tfcompat import new_session, seed_everything

    graph = tf.Graph()
    with graph.as_default():
        seed_everything(seed)
        images = tf1.placeholder(tf.float32, [1, 299, 299, 3])
        network.build(
            images, num_classes=1001, is_training=False, depth_multiplier=depth_multiplier
        )
        saver = tf1.train.Saver(network.model_variables(graph), write_version=tf1.train.SaverDef.V1)
        init = tf1.global_variables_initializer()
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_session(graph) as session:
        session.run(init)
        with graph.as_default():
            saver.save(session, str(path), write_meta_graph=False, write_state=False)
    return path
