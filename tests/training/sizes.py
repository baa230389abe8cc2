"""Sizes the training tests share.

TEST_DEPTH: the tests' Inception V3 is TF-Slim's own network at this depth
multiplier (every layer's channels x 0.25, at least 16): the same architecture, layer
names, preprocessing, freezing, conversion and quantisation as the published one, at
an eighth of its CPU time (21 vs 166 ms an image on one core of a Xeon; 0.1 is no
faster, as the first layers, already at their minimum width of 16, dominate), so the
suite stays fast on a slow 2-core machine. Real users keep 1.0;
tests/training/test_network.py covers the full width (the public checkpoint's 388
variables and their shapes, restored into a 2-class run).
"""

from __future__ import annotations

TEST_DEPTH = 0.25
TEST_BASE = "random test base (tests/training/conftest.py), not ImageNet"
"""What the tests' base checkpoint is (export's --base-is: its hash is not the published)."""
