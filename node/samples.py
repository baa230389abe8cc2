"""Field samples on the node: which answered images are kept for labelling, and the
spool that keeps them until the hub has them (issue 20; `[samples]` in node.toml).

Off by default. `SampleKeeper` is an observer (node/observers.py) of every answered
image; of a consenting source only (`samples.sources`: a Result's `source`, the
account its images topic names; any other source, and a local file, is never kept)
it keeps an image for one reason, asked in this order:

- `random`: a `random_share` of the images, drawn before anything else is looked
  at, so the random samples stay an unbiased sample of what the node sees;
- `disagreement`: the shadow candidate answered another label (node/shadow.py tells
  the keeper through `ShadowScorer.on_disagreement`, on the same observer thread
  right before the keeper sees the image);
- `low_confidence`: the Result says `low_confidence`, i.e. the bundle's own band
  (the manifest's `decision.low_confidence` [lo, hi] of p(positive), or, for a bundle
  without a decision rule, its `low_confidence_threshold`).

Each reason has a limit per rolling hour and per rolling 24 hours (`per_hour`,
`per_day`), which hold across a restart (`limits.state` in the spool). The choice is cheap and
made on the observer thread; the image is handed to the keeper's own writer thread
through a bounded queue (`queue`), so decoding and writing never hold up the other
observers, let alone a Result: a full queue drops the image (counted `queue`).

A sample is the image's pixels (decoded at full size, as the node decodes them)
re-encoded as a lossless PNG by OpenCV, which writes no metadata: TIFF tags, EXIF,
ICC profiles and text chunks of the image as received are not carried over. Its id
is the SHA-256 of the PNG's bytes (shared/samples.py), its record a `SampleRow`.

The spool that keeps the samples on disk until the hub has them is node/spool.py.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from cellwatch.node.config import ReasonLimits, SamplesSettings
from cellwatch.node.decode import ImageError, ImageLimits, decode
from cellwatch.node.observers import Observation
from cellwatch.node.spool import Spool, SpoolFull
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.samples import SampleReason, SampleRow, sample_id
from cellwatch.shared.schemas import SampleFigures

log = logging.getLogger(__name__)

HOUR_S = 3600.0
DAY_S = 86400.0
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]
"""zlib level 6: lossless; the same pixels give the same bytes (the same id)."""
POSITIVE_LABEL = "ALL"
"""Whose probability a sample's record carries (`p_all`) when the bundle's decision rule
names none."""


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG of RGB uint8 pixels, without any metadata chunk."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), PNG_PARAMS)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise ValueError("OpenCV could not encode a PNG")
    return png.tobytes()


class ReasonLimiter:
    """Per reason, at most `per_hour` in any rolling hour and `per_day` in any 24 h
    (a pure engine: `now` is given, in seconds)."""

    def __init__(self, per_hour: ReasonLimits, per_day: ReasonLimits) -> None:
        self.per_hour = per_hour
        self.per_day = per_day
        self._taken: dict[SampleReason, deque[float]] = {r: deque() for r in SampleReason}

    def take(self, reason: SampleReason, now: float) -> bool:
        """Count one sample of reason at now, if the limits allow it."""
        times = self._taken[reason]
        while times and times[0] <= now - DAY_S:
            times.popleft()
        hour = sum(1 for t in times if t > now - HOUR_S)
        if hour >= getattr(self.per_hour, reason.value) or len(times) >= getattr(
            self.per_day, reason.value
        ):
            return False
        times.append(now)
        return True

    def seed(self, reason: SampleReason, at: float) -> None:
        """A sample taken before this process started."""
        times = self._taken[reason]
        times.append(at)
        self._taken[reason] = deque(sorted(times))

    def taken(self) -> dict[str, list[float]]:
        """The times counted, per reason (what `seed` takes back after a restart)."""
        return {r.value: list(t) for r, t in self._taken.items()}


@dataclass(frozen=True)
class _Chosen:
    obs: Observation
    reason: SampleReason
    at: float


class SampleKeeper:
    """The observer that chooses samples and its writer thread (module docstring)."""

    def __init__(
        self,
        settings: SamplesSettings,
        *,
        node_id: str,
        spool: Spool,
        limits: ImageLimits,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.spool = spool
        self.limits = limits
        self.sources = frozenset(settings.sources)
        self._rng = rng or random.Random()
        self._clock = clock
        self.limiter = ReasonLimiter(settings.per_hour, settings.per_day)
        self._queue: Handoff[_Chosen] = Handoff(settings.queue, name=f"node {node_id}: samples")
        self._disagreed: Observation | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._writing = 0
        """Chosen images not yet written or dropped."""
        self.kept: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.uploaded = 0
        self.written = threading.Event()
        """Set when a sample was spooled (the uploader waits on it when idle)."""

    def count_uploaded(self) -> None:
        with self._lock:
            self.uploaded += 1

    def start(self) -> None:
        """Scan the spool and seed the limits: from the times they counted before, or
        else from the samples spooled (before the threads start)."""
        rows = self.spool.scan(self._clock())
        taken = self.spool.read_limits()
        if taken is None:
            taken = {}
            for row in rows:
                taken.setdefault(row.reason.value, []).append(row.collected_at.timestamp())
        for reason, times in taken.items():
            for at in times:
                self.limiter.seed(SampleReason(reason), at)

    # -- the observer thread ---------------------------------------------------------
    def on_disagreement(self, obs: Observation) -> None:
        """The shadow scorer's candidate disagreed on obs (same thread, just before)."""
        self._disagreed = obs

    def missed(self, obs: Observation) -> None:
        """The observers' queue was full: the image was not looked at."""

    def observe(self, obs: Observation, waiting: Callable[[], int]) -> None:
        disagreed, self._disagreed = self._disagreed is obs, None
        source = obs.result.source
        if source is None or source not in self.sources:
            return  # no consent: never kept
        reason = self._reason(obs, disagreed)
        if reason is None:
            return
        now = self._clock()
        with self._lock:
            if not self.limiter.take(reason, now):
                self.dropped["limit"] += 1
                return
            self._writing += 1
        if not self._queue.offer(_Chosen(obs, reason, now)):
            self._done()
            self._drop("queue", obs, reason)

    def _reason(self, obs: Observation, disagreed: bool) -> SampleReason | None:
        s = self.settings
        if s.random_share > 0 and self._rng.random() < s.random_share:
            return SampleReason.RANDOM
        if s.disagreement and disagreed:
            return SampleReason.DISAGREEMENT
        if s.low_confidence and obs.result.low_confidence:
            return SampleReason.LOW_CONFIDENCE
        return None

    # -- the writer thread -----------------------------------------------------------
    def run(self) -> None:
        """The writer thread, until `close`."""
        while (chosen := self._queue.get()) is not None:
            try:
                self._keep(chosen)
            except Exception:  # one image's bug must not end the thread
                log.exception(
                    "node %s: samples: keeping image %s failed",
                    self.node_id,
                    chosen.obs.result.image_id,
                )
                self._drop("failed", chosen.obs, chosen.reason)
            finally:
                with self._lock:
                    taken = self.limiter.taken()
                self.spool.write_limits(taken)
                self._done()

    def _done(self) -> None:
        with self._idle:
            self._writing -= 1
            self._idle.notify_all()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every image chosen so far is written or dropped (False: timeout)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._writing == 0, timeout)

    def close(self) -> None:
        self._queue.close()

    def _keep(self, chosen: _Chosen) -> None:
        obs, reason = chosen.obs, chosen.reason
        row_of = self._row_maker(obs, reason, chosen.at)
        if row_of is None:
            self._drop("no_p_all", obs, reason)
            return
        try:
            rgb, _ = decode(obs.payload, self.limits, max(obs.width, obs.height, 1))
        except ImageError:
            self._drop("undecodable", obs, reason)
            return
        png = encode_png(rgb)
        row = row_of(sample_id(png))
        try:
            added = self.spool.put(png, row)
        except SpoolFull as exc:
            self._drop("quota", obs, reason, str(exc))
            return
        except OSError as exc:
            self._drop("disk", obs, reason, str(exc))
            return
        if added:
            with self._lock:
                self.kept[reason.value] += 1
            self.written.set()
            log.info(
                "node %s: samples: image %s of %s kept (%s) as %s",
                self.node_id,
                obs.result.image_id,
                row.source,
                reason.value,
                row.id[:12],
            )

    def _row_maker(
        self, obs: Observation, reason: SampleReason, at: float
    ) -> Callable[[str], SampleRow] | None:
        result, manifest = obs.result, obs.model.bundle.manifest
        positive = manifest.decision.positive_label if manifest.decision else POSITIVE_LABEL
        p_all = (result.probabilities or {}).get(positive)
        if p_all is None or result.label is None or result.source is None:
            return None
        source, label = result.source, result.label
        model = f"{manifest.name}@{manifest.version}"
        when = datetime.fromtimestamp(at, UTC)

        def row(sample: str) -> SampleRow:
            return SampleRow(
                id=sample,
                source=source,
                node=self.node_id,
                model=model,
                p_all=p_all,
                predicted=label,
                reason=reason,
                collected_at=when,
            )

        return row

    def _drop(self, cause: str, obs: Observation, reason: SampleReason, why: str = "") -> None:
        with self._lock:
            self.dropped[cause] += 1
        log.warning(
            "node %s: samples: image %s (%s) not kept: %s%s",
            self.node_id,
            obs.result.image_id,
            reason.value,
            cause,
            f" ({why})" if why else "",
        )

    # -- figures ---------------------------------------------------------------------
    def figures(self) -> SampleFigures:
        with self._lock:
            dropped = dict(self.dropped + self.spool.lost)
            return SampleFigures(
                kept=dict(self.kept),
                dropped=dropped,
                uploaded=self.uploaded,
                spooled=len(self.spool),
                spool_bytes=self.spool.size_bytes,
            )


def spool_of(settings: SamplesSettings, state_dir: Path, node_id: str) -> Spool:
    return Spool(
        settings.resolved_spool(state_dir),
        int(settings.quota_mb * 1024 * 1024),
        settings.retention_days * DAY_S,
        node_id,
    )


__all__ = [
    "ReasonLimiter",
    "SampleKeeper",
    "encode_png",
    "spool_of",
]
