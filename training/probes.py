"""Golden probe inputs: what a node's self-test runs, without a single patient image.

A bundle travels to every node, so it must not carry images from the data set.
Its golden vectors are made here from nothing but seeds:

- `uniform`: i.i.d. uniform noise in [-1, 1];
- `smooth`: low-frequency noise (a 12x12 random field, bicubically enlarged), which
  drives the early convolutions very differently from white noise;
- `smear-normal`, `smear-ALL`: SYNTHETIC smears from `synth.smear`, eval-preprocessed;
- `boundary`: a blend of a synthetic normal and ALL smear, the blend weight found by
  bisection so that the model puts p(ALL) at its decision threshold.

Probes far from the boundary pin the probabilities; the boundary probes sit where
the softmax is steepest, so any change of the weights that moves the logits shows up
there first. tests/training/test_probes.py checks that a changed weight fails the
node's self-test.

Steep also means sensitive to reduced-precision arithmetic: a node computing in bf16
must still pass. So every probe must be *stable*: the IR at the device's default
inference precision gives probabilities within `limit` of its f32 ones on the export
machine (half the node's low-precision tolerance). A boundary probe that is not is
moved along its blend line, away from the threshold, to the nearest stable point; a
noise or smear probe is redrawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import cv2
import numpy as np

from cellwatch.training import IMAGE_SIZE
from cellwatch.training.errors import ExportError
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.synth import smear

PROBE_SEED = 0x601D
BISECTION_STEPS = 14
REDRAWS = 8
BLEND_STEP = 1 / 64
DESCRIPTION = (
    "synthetic probes, no patient data: 2 uniform noise, 2 smooth noise, 2 SYNTHETIC "
    "smears (normal, ALL), 2 blends of smears near the decision threshold"
)
Predict = Callable[[np.ndarray], np.ndarray]
"""inputs [N, 299, 299, 3] -> probabilities [N, classes]."""
Stable = Callable[[np.ndarray], bool]
"""input [299, 299, 3] -> whether reduced precision reproduces it closely enough."""


def stability(f32: Predict, deployed: Predict, limit: float) -> Stable:
    def stable(x: np.ndarray) -> bool:
        batch = x[np.newaxis]
        return float(np.abs(f32(batch) - deployed(batch)).max()) <= limit

    return stable


def _smooth(rng: np.random.Generator) -> np.ndarray:
    small = rng.uniform(-1, 1, (12, 12, 3)).astype(np.float32)
    big = cv2.resize(small, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC)
    return np.clip(big, -1.0, 1.0).astype(np.float32)


def _blend(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    return ((1 - w) * a + w * b).astype(np.float32)


def _boundary_weight(
    predict: Predict, a: np.ndarray, b: np.ndarray, threshold: float, positive: int
) -> float:
    """The blend weight w of (1-w) a + w b whose p(positive) is closest to threshold."""

    def p(w: float) -> float:
        return float(predict(_blend(a, b, w)[np.newaxis])[0, positive])

    lo, hi = 0.0, 1.0
    p_lo, p_hi = p(lo), p(hi)
    if (p_lo - threshold) * (p_hi - threshold) > 0:  # same side: take the nearest of a grid
        return min((i / 8 for i in range(9)), key=lambda w: abs(p(w) - threshold))
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        p_mid = p(mid)
        if (p_mid - threshold) * (p_lo - threshold) > 0:
            lo, p_lo = mid, p_mid
        else:
            hi, p_hi = mid, p_mid
    return lo if abs(p_lo - threshold) <= abs(p_hi - threshold) else hi


def _outward(w: float) -> Iterator[float]:
    """w, then points on both sides at growing distance, within [0, 1]."""
    yield w
    for k in range(1, int(1 / BLEND_STEP) + 1):
        for candidate in (w - k * BLEND_STEP, w + k * BLEND_STEP):
            if 0.0 <= candidate <= 1.0:
                yield candidate


def _first_stable(candidates: Iterator[np.ndarray], stable: Stable, kind: str) -> np.ndarray:
    for x in candidates:
        if stable(x):
            return x
    raise ExportError(
        f"no {kind} golden probe is reproducible at this CPU's default inference precision "
        "within the node's self-test tolerance: the model is too sensitive to reduced "
        "precision to ship with a meaningful self-test"
    )


def golden_probes(
    predict: Predict, stable: Stable, *, threshold: float = 0.5, positive: int = 1
) -> tuple[np.ndarray, list[str]]:
    """Probe inputs [8, 299, 299, 3] (float32, in [-1, 1]) and what each one is.

    predict: the IR at f32 (the golden probabilities); stable: see `stability`.
    """
    rng = np.random.default_rng(PROBE_SEED)
    inputs: list[np.ndarray] = []
    kinds: list[str] = []

    def draws(make: Callable[[], np.ndarray]) -> Iterator[np.ndarray]:
        return (make() for _ in range(REDRAWS))

    for _ in range(2):
        uniform = _first_stable(
            draws(lambda: rng.uniform(-1, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)),
            stable,
            "uniform noise",
        )
        inputs.append(uniform)
        kinds.append("uniform")
    for _ in range(2):
        inputs.append(_first_stable(draws(lambda: _smooth(rng)), stable, "smooth noise"))
        kinds.append("smooth")
    with Preprocessor() as pre:
        smears = {
            (label, i): pre.eval(smear(label, PROBE_SEED, i))
            for label in (0, 1)
            for i in range(REDRAWS)
        }
    for label, kind in ((0, "smear-normal"), (1, "smear-ALL")):
        candidates = (smears[label, i] for i in range(REDRAWS))
        inputs.append(_first_stable(candidates, stable, kind))
        kinds.append(kind)
    for i in (0, 1):
        a, b = smears[0, i], smears[1, i]
        w = _boundary_weight(predict, a, b, threshold, positive)
        inputs.append(_first_stable((_blend(a, b, v) for v in _outward(w)), stable, "boundary"))
        kinds.append("boundary")
    return np.stack(inputs).astype(np.float32), kinds
