"""Near-duplicate detection (not a test): what the perceptual hash and the bottleneck
features find among altered copies of SYNTHETIC smears, and how often they merge
distinct ones (training/README.md, "Leakage").

The altered copies are issue 18's cases (tests/training/altered.py: crops to 80% and
70%, a 20° rotation, a 20 px shift, histogram equalisation, a 10% zoom). Features come
from `--checkpoint` (the published inception_v3.ckpt, to measure the threshold for
real), or from a random-weights base the bench writes (the only one available
offline):

    .venv/bin/python bench/leakage.py [--checkpoint inception_v3.ckpt]
    [--depth-multiplier 1.0] [--sources 20] [--distinct 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellwatch.training import network
from cellwatch.training.checkpoint import restore, write_random_base
from cellwatch.training.groups import PHASH_MAX_DISTANCE, hash_bytes, phash
from cellwatch.training.leakage import COSINE_MIN, centred_cosine
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.synth import smear
from cellwatch.training.tfcompat import new_session, seed_everything, tf, tf1
from tests.training.altered import ALTERATIONS


def features(images: list[np.ndarray], checkpoint: Path, depth: float) -> np.ndarray:
    graph = tf.Graph()
    with graph.as_default():
        seed_everything(0)
        x = tf1.placeholder(tf.float32, [None, 299, 299, 3])
        net = network.build(x, is_training=False, depth_multiplier=depth)
        variables = network.model_variables(graph)
    with new_session(graph) as session:
        with graph.as_default():
            restore(session, checkpoint, variables, exclude=network.HEAD_SCOPES)
        with Preprocessor() as pre:
            inputs = np.stack([pre.eval(im) for im in images])
        out = [session.run(net.prelogits, {x: inputs[i : i + 8]}) for i in range(0, len(inputs), 8)]
    return np.concatenate(out).reshape(len(images), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--depth-multiplier", type=float, default=1.0)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--distinct", type=int, default=40)
    args = parser.parse_args()
    sources = [smear(i % 2, 7, i) for i in range(args.sources)]
    distinct = [smear(i % 2, 8, i) for i in range(args.distinct)]
    images, kind, owner = [*sources, *distinct], [], []
    kind += ["original"] * len(images)
    owner += list(range(len(sources))) + [-1] * len(distinct)
    for name, alter in ALTERATIONS.items():
        for i, s in enumerate(sources):
            images.append(alter(s))
            kind.append(name)
            owner.append(i)
    checkpoint = args.checkpoint or write_random_base(
        Path(tempfile.mkdtemp()) / "inception_v3.ckpt", 1, args.depth_multiplier
    )
    cos = centred_cosine(features(images, checkpoint, args.depth_multiplier))
    hashes = hash_bytes([phash(im) for im in images])

    def bits(a: int, b: int) -> int:
        return int(np.bitwise_count(hashes[a] ^ hashes[b, :1]).sum(axis=1).min())

    n = len(sources) + len(distinct)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    print(
        f"base: {'random weights' if args.checkpoint is None else checkpoint}, depth "
        f"{args.depth_multiplier:g}; {len(pairs)} distinct pairs: pHash false merges "
        f"{sum(bits(a, b) <= PHASH_MAX_DISTANCE for a, b in pairs)} (closest "
        f"{min(bits(a, b) for a, b in pairs)} bits), feature false merges "
        f"{sum(cos[a, b] >= COSINE_MIN for a, b in pairs)} (highest "
        f"{max(cos[a, b] for a, b in pairs):.2f})"
    )
    for name in ALTERATIONS:
        idx = [i for i, k in enumerate(kind) if k == name]
        d = [bits(i, owner[i]) for i in idx]
        c = [float(cos[i, owner[i]]) for i in idx]
        print(
            f"  {name:<24} pHash {min(d)}-{max(d)} bits, found "
            f"{sum(x <= PHASH_MAX_DISTANCE for x in d)}/{len(d)}; cosine {min(c):.2f}-"
            f"{max(c):.2f}, found {sum(x >= COSINE_MIN for x in c)}/{len(c)}"
        )


if __name__ == "__main__":
    main()
