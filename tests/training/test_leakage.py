"""Near-duplicates are merged into one group before the split (issue 18, point 4), and
what each detector finds on the altered copies a perceptual hash misses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellwatch.training.bottleneck import base_features
from cellwatch.training.groups import PHASH_MAX_DISTANCE, hash_bytes, phash
from cellwatch.training.leakage import (
    COSINE_MIN,
    Merge,
    centred_cosine,
    feature_pairs,
    merged_groups,
    phash_pairs,
)
from cellwatch.training.runinfo import FitConfig
from cellwatch.training.split import load_split
from cellwatch.training.synth import smear
from cellwatch.training.trainer import BottleneckTrainer
from tests.training.altered import ALTERATIONS
from tests.training.sizes import TEST_DEPTH

SOURCES = 12
DISTINCT = 24


def bits(a: list[str], b: list[str]) -> int:
    ha, hb = hash_bytes([a]), hash_bytes([b])
    return int(np.bitwise_count(ha[0] ^ hb[0, :1]).sum(axis=1).min())


def test_perceptual_hash_on_altered_copies_and_distinct_images() -> None:
    """The figures in training/README.md (Leakage): at its threshold pHash finds 1 of
    72 altered copies (one equalised image), and merges no distinct images."""
    sources = [smear(i % 2, 31, i) for i in range(SOURCES)]
    distinct = [smear(i % 2, 32, i) for i in range(DISTINCT)]
    hashes = [phash(x) for x in sources + distinct]
    paths = [f"s{i}" for i in range(len(hashes))]
    assert phash_pairs(paths, hashes) == []  # no false merge among 36 distinct images
    closest = min(bits(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    assert closest > PHASH_MAX_DISTANCE
    found = {}
    for name, alter in ALTERATIONS.items():
        distances = [bits(phash(alter(s)), h) for s, h in zip(sources, hashes, strict=False)]
        found[name] = sum(d <= PHASH_MAX_DISTANCE for d in distances)
        print(f"{name}: pHash {min(distances)}-{max(distances)} bits, found {found[name]}/12")
    print(f"distinct: closest pair {closest} bits")
    # the figures in training/README.md; the five the hash misses are why features are needed
    assert found == {name: 1 if name == "histogram equalisation" else 0 for name in ALTERATIONS}
    # what pHash is for: a flipped, turned, re-encoded copy
    turned = np.ascontiguousarray(np.rot90(sources[0][:, ::-1]))
    assert phash_pairs(["a", "b"], [hashes[0], phash(turned)])[0].by == "phash"


def test_feature_pairs_merge_copies_not_distinct_images() -> None:
    rng = np.random.default_rng(3)
    distinct = rng.normal(0, 1, (20, 64))
    copies = distinct[:5] + rng.normal(0, 0.05, (5, 64))  # a copy's features move a little
    features = np.concatenate([distinct, copies])
    paths = [f"d{i}" for i in range(20)] + [f"c{i}" for i in range(5)]
    pairs = feature_pairs(paths, features)
    assert {(m.a, m.b) for m in pairs} == {(f"d{i}", f"c{i}") for i in range(5)}
    assert all(m.by == "features" and m.distance >= COSINE_MIN for m in pairs)
    # centring: a component every image shares does not make distinct images alike
    shared = features + 50.0
    assert np.allclose(centred_cosine(shared), centred_cosine(features))


def test_merged_groups_are_transitive_and_order_free() -> None:
    groups = {"a": "g1", "b": "g2", "c": "g3", "d": "g4"}
    pairs = [
        Merge(a="a", b="b", by="phash", distance=3),
        Merge(a="c", b="b", by="features", distance=0.99),
    ]
    one = merged_groups(groups, pairs)
    two = merged_groups(groups, pairs[::-1])
    assert one == two == {"a": "g1", "b": "g1", "c": "g1", "d": "g4"}


def test_prepare_features_are_the_cache_fit_reuses(
    split_dir: Path, imagenet_ckpt: Path, tmp_path: Path
) -> None:
    """`prepare --checkpoint` computes the bottlenecks `fit` would: same cache entries."""
    split = load_split(split_dir)
    entries = [e for n in ("train", "val", "test") for e in split.entries(n)]
    cache = tmp_path / "cache"
    features = base_features(split.root, entries, imagenet_ckpt, TEST_DEPTH, cache)
    assert features.shape == (len(entries), 512)
    trainer = BottleneckTrainer(FitConfig(depth_multiplier=TEST_DEPTH), split, imagenet_ckpt)
    try:
        trainer.prepare(cache)
        assert trainer.cache is not None and trainer.cache.misses == 0
        assert trainer.cache.hits == len(split.entries("train")) + len(split.entries("val"))
    finally:
        trainer.close()


@pytest.mark.parametrize("name", sorted(ALTERATIONS))
def test_alterations_change_the_image(name: str) -> None:
    original = smear(1, 31, 0)
    assert np.abs(ALTERATIONS[name](original).astype(int) - original).mean() > 2
