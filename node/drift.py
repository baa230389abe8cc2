"""Drift: each node's live images against its bundle's reference (shared/drift.py).

An observer (node/observers.py) of every answered image: it keeps the last
`drift.window` images' figures (since the serving model was loaded: a new model has
its own reference, so the window starts again) and, for telemetry, compares each
signal with the reference the bundle's export measured on its validation split.

The statistic, per signal, is two numbers:
- the population stability index, PSI = sum((live - ref) * ln(live / ref)) over the
  bins' shares (each count + 0.5, so an empty bin stays finite): how far the
  distribution moved, whatever the sample sizes;
- the p-value of a chi-square test of homogeneity on the two rows of counts: whether
  that much movement could be chance, given how many images each side has.

The state needs both (`state_of`):
- `alert`: PSI >= 0.25 and p < 0.001;
- `watch`: PSI >= 0.10 and p < 0.01;
- `ok` otherwise; `collecting` under `drift.min_images` live images; `no_reference`
  for a bundle without one.
PSI's 0.10 / 0.25 are the bands credit-risk models have long used for "some" and
"significant" shift (Siddiqi 2006). PSI alone misleads with few images: under no drift
its expected value is about (bins - 1) x (1/n_live + 1/n_ref), 0.13 for four bins, 500
live images and a 24-image reference, already past `watch`. The chi-square p-value is
that correction: a small reference or window cannot raise an alarm by noise alone,
and a huge one cannot turn a trivial shift into one, because the PSI bound still holds.
The p-value bounds are strict because the node looks again at every telemetry, on a
window that changes a few images at a time, and at six signals: `alert` is meant to be
rare without drift. `color` is the channel that moved most, its p-value multiplied by
three (Bonferroni: three channels were looked at).

The accuracy estimate without labels (confidence-based performance estimation) is
the mean calibrated probability of the label each image was given, with the interval
of that mean as a sum of Bernoulli trials. It holds only while the probabilities are
calibrated: it is `supported` when the bundle's calibration was checked on at least
CALIBRATION_MIN_N held-out images with an ECE of at most CALIBRATION_MAX_ECE, and the
note says plainly when it is not (and when the inputs have drifted, where the
calibration measured on the reference may not hold).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2_contingency

from cellwatch.node.observers import Observation
from cellwatch.shared.drift import (
    CONFIDENCE_CUTS,
    AccuracyEstimate,
    Bins,
    DriftFigures,
    DriftReference,
    DriftSignal,
    SignalDrift,
    bin_index,
    histogram,
    input_statistics,
)
from cellwatch.shared.figures import Z95
from cellwatch.shared.manifest import Manifest
from cellwatch.shared.states import DRIFT_SEVERITY, DriftState

PSI_WATCH = 0.10
PSI_ALERT = 0.25
P_WATCH = 0.01
P_ALERT = 0.001
CALIBRATION_MIN_N = 100
"""Held-out images the bundle's calibration check needs for the accuracy estimate: with
fewer, the ECE's own noise is about as large as CALIBRATION_MAX_ECE."""
CALIBRATION_MAX_ECE = 0.05
INPUT_SIGNALS = (DriftSignal.SIZE, DriftSignal.COLOR, DriftSignal.SHARPNESS)


def compare(reference: Sequence[int], live: Sequence[int]) -> tuple[float, float]:
    """(PSI, chi-square p-value) of two rows of counts over the same bins."""
    r = np.asarray(reference, np.float64)
    v = np.asarray(live, np.float64)
    keep = (r + v) > 0
    r, v = r[keep], v[keep]
    if len(r) < 2 or r.sum() == 0 or v.sum() == 0:
        return 0.0, 1.0
    rs = (r + 0.5) / (r.sum() + 0.5 * len(r))
    vs = (v + 0.5) / (v.sum() + 0.5 * len(v))
    psi = float(np.sum((vs - rs) * np.log(vs / rs)))
    p = float(chi2_contingency(np.vstack([r, v]), correction=False).pvalue)
    return psi, min(max(p, 0.0), 1.0)


def state_of(psi: float, p: float) -> DriftState:
    if psi >= PSI_ALERT and p < P_ALERT:
        return DriftState.ALERT
    if psi >= PSI_WATCH and p < P_WATCH:
        return DriftState.WATCH
    return DriftState.OK


def worst(states: Sequence[DriftState]) -> DriftState:
    return max(states, key=lambda s: DRIFT_SEVERITY.get(s, -1), default=DriftState.OK)


def calibration_note(manifest: Manifest) -> str | None:
    """Why the bundle's calibration cannot support an accuracy estimate (None: it can)."""
    cal = manifest.calibration
    check = cal.test if cal is not None else None
    if check is None:
        return "the bundle carries no held-out calibration check: no basis for this estimate"
    if check.n < CALIBRATION_MIN_N or check.ece > CALIBRATION_MAX_ECE:
        return (
            f"calibration too weak to support this estimate: ECE {check.ece:.3f} on "
            f"{check.n} {check.split} images (needs at least {CALIBRATION_MIN_N} images and "
            f"ECE <= {CALIBRATION_MAX_ECE:g})"
        )
    return None


@dataclass(frozen=True, slots=True)
class _Seen:
    positive: float
    label: int
    low: bool
    confidence: float
    megapixels: float
    stats: tuple[float, float, float, float]


class DriftMonitor:
    """The observer (see the module docstring); thread-safe."""

    def __init__(self, window: int, min_images: int) -> None:
        self.window = window
        self.min_images = min_images
        self._lock = threading.Lock()
        self._seen: deque[_Seen] = deque(maxlen=window)
        self._manifest: Manifest | None = None
        self._sha: str | None = None
        self._labels: list[str] = []
        self._positive = 0
        self._total_conf = [0] * (len(CONFIDENCE_CUTS) + 1)
        self._total_sum = 0.0
        self._total_labels: dict[str, int] = {}
        self._dropped = 0

    # -- observer ---------------------------------------------------------------------
    def observe(self, obs: Observation, waiting: Callable[[], int]) -> None:
        stats = input_statistics(obs.pixels)
        self._add(obs, stats)

    def missed(self, obs: Observation) -> None:
        with self._lock:
            self._dropped += 1
        self._count(obs)

    def _model(self, obs: Observation) -> None:
        """Lock held: a new serving model starts a new window against its reference."""
        bundle = obs.model.bundle
        if bundle.manifest_sha256 == self._sha:
            return
        m = bundle.manifest
        self._manifest, self._sha, self._labels = m, bundle.manifest_sha256, list(m.labels)
        if m.reference is not None:
            positive = m.reference.positive_label
        elif m.decision is not None:
            positive = m.decision.positive_label
        else:
            positive = m.labels[-1]
        self._positive = m.labels.index(positive)
        self._seen.clear()

    def _count(self, obs: Observation) -> float:
        """Since-start counts of one Result; its p(positive label)."""
        r = obs.result
        with self._lock:
            self._model(obs)
            probs = r.probabilities or {}
            p = float(probs.get(self._labels[self._positive], 0.0))
            self._total_conf[int(bin_index(CONFIDENCE_CUTS, np.array([p]))[0])] += 1
            self._total_sum += p
            label = r.label or ""
            self._total_labels[label] = self._total_labels.get(label, 0) + 1
        return p

    def _add(self, obs: Observation, stats: tuple[float, float, float, float]) -> None:
        r = obs.result
        p = self._count(obs)
        seen = _Seen(
            positive=p,
            label=r.class_index or 0,
            low=bool(r.low_confidence),
            confidence=float(r.confidence or 0.0),
            megapixels=obs.width * obs.height / 1e6,
            stats=stats,
        )
        with self._lock:
            self._seen.append(seen)

    # -- telemetry --------------------------------------------------------------------
    def figures(self) -> DriftFigures | None:
        """The figures over the window now (None before the first image)."""
        with self._lock:
            if self._manifest is None:
                return None
            manifest, labels, seen = self._manifest, list(self._labels), list(self._seen)
            totals = (list(self._total_conf), self._total_sum, dict(self._total_labels))
            dropped = self._dropped
        ref = manifest.reference
        n = len(seen)
        positive = np.array([s.positive for s in seen], np.float64)
        conf = histogram(CONFIDENCE_CUTS, positive)
        label_counts = np.bincount(
            np.array([s.label for s in seen], np.int64), minlength=len(labels)
        )
        low = sum(s.low for s in seen)
        signals: dict[DriftSignal, SignalDrift] = {}
        if ref is None:
            state = DriftState.NO_REFERENCE
        elif n < self.min_images:
            state = DriftState.COLLECTING
        else:
            signals = self._signals(ref, labels, seen, conf, label_counts, low)
            state = worst([s.state for s in signals.values()])
        return DriftFigures(
            window=self.window,
            n=n,
            state=state,
            reference_n=ref.n if ref is not None else None,
            confidence=conf,
            labels={label: int(c) for label, c in zip(labels, label_counts, strict=False)},
            low_confidence=low,
            signals=signals,
            accuracy=self._accuracy(manifest, seen, signals),
            total_confidence=totals[0],
            total_confidence_sum=round(totals[1], 6),
            total_labels=totals[2],
            dropped=dropped,
        )

    def _signals(
        self,
        ref: DriftReference,
        labels: list[str],
        seen: list[_Seen],
        conf: list[int],
        label_counts: np.ndarray,
        low: int,
    ) -> dict[DriftSignal, SignalDrift]:
        n = len(seen)
        stats = np.array([s.stats for s in seen], np.float64)
        mp = np.array([s.megapixels for s in seen], np.float64)

        def signal(ref_counts: Sequence[int], live: Sequence[int], tests: int = 1) -> SignalDrift:
            psi, p = compare(ref_counts, live)
            p = min(1.0, p * tests)
            return SignalDrift(state=state_of(psi, p), psi=round(psi, 6), p_value=p)

        def binned(b: Bins, values: np.ndarray, tests: int = 1) -> SignalDrift:
            return signal(b.counts, histogram(b.cuts, values), tests)

        colors = [binned(ref.color[i], stats[:, i], tests=3) for i in range(3)]
        return {
            DriftSignal.CONFIDENCE: signal(ref.confidence.counts, conf),
            DriftSignal.LABELS: signal(
                [ref.labels.get(label, 0) for label in labels], list(label_counts)
            ),
            DriftSignal.LOW_CONFIDENCE: signal(
                [ref.low_confidence, ref.n - ref.low_confidence], [low, n - low]
            ),
            DriftSignal.SIZE: binned(ref.size, mp),
            DriftSignal.COLOR: max(colors, key=lambda s: s.psi or 0.0),
            DriftSignal.SHARPNESS: binned(ref.sharpness, stats[:, 3]),
        }

    def _accuracy(
        self, manifest: Manifest, seen: list[_Seen], signals: dict[DriftSignal, SignalDrift]
    ) -> AccuracyEstimate | None:
        if not seen:
            return None
        c = np.array([s.confidence for s in seen], np.float64)
        n = len(c)
        value = float(c.mean())
        half = Z95 * math.sqrt(float(np.sum(c * (1 - c)))) / n
        weak = calibration_note(manifest)
        note = weak
        drifted = [
            str(s) for s in INPUT_SIGNALS if (d := signals.get(s)) and d.state is DriftState.ALERT
        ]
        if drifted:
            extra = (
                f"the inputs have drifted ({', '.join(drifted)}): the calibration measured on "
                "the reference may not hold on them"
            )
            note = f"{note}; {extra}" if note else extra
        return AccuracyEstimate(
            value=round(value, 4),
            ci95=(round(max(0.0, value - half), 4), round(min(1.0, value + half), 4)),
            n=n,
            supported=weak is None,
            note=note[:300] if note else None,
        )
