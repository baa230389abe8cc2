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

`Spool`: `<id>.png` and `<id>.json` (the record) in the spool directory, each written
to a temporary file, fsynced and renamed, the record last: a sample exists once its
record does. At start the spool is scanned: temporary files and images without a
record (a write cut short) are removed; a record that does not parse or whose image is
missing or does not hash to its id is moved to `corrupt/` (logged and counted
`corrupt`, never uploaded); a sample older than `retention_days` is deleted (counted
`expired`, also while the node runs). A sample over `quota_mb` or a write that fails
(a full disk) is dropped and counted (`quota`, `disk`): never a Result, which went
out before the keeper saw the image. The uploader (node/sampleupload.py) deletes a
sample only after the hub acknowledged it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from pydantic import ValidationError

from cellwatch.node.config import ReasonLimits, SamplesSettings
from cellwatch.node.decode import ImageError, ImageLimits, decode
from cellwatch.node.observers import Observation
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.samples import SampleReason, SampleRow, sample_file_name, sample_id
from cellwatch.shared.schemas import SampleFigures

log = logging.getLogger(__name__)

HOUR_S = 3600.0
DAY_S = 86400.0
RECORD_SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
CORRUPT_DIR = "corrupt"
LIMITS_FILE = "limits.state"
"""The times each reason's limits counted in the last 24 hours (JSON), so that a restart
does not start the limits afresh."""
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]
"""zlib level 6: lossless; the same pixels give the same bytes (the same id)."""
POSITIVE_LABEL = "ALL"
"""Whose probability a sample's record carries (`p_all`) when the bundle's decision rule
names none."""


class SpoolFull(Exception):
    """The sample would take the spool over its quota."""


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
class Spooled:
    row: SampleRow
    size: int
    """The PNG's bytes."""


class Spool:
    """The samples on disk (see the module docstring); thread-safe."""

    def __init__(self, root: Path, quota_bytes: int, retention_s: float, node_id: str) -> None:
        self.root = root
        self.quota_bytes = quota_bytes
        self.retention_s = retention_s
        self.node_id = node_id
        self._lock = threading.Lock()
        self._index: dict[str, Spooled] = {}
        self.lost: Counter[str] = Counter()
        """Spooled samples lost: corrupt, expired."""

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def png(self, sample: str) -> Path:
        return self.root / sample_file_name(sample)

    def record(self, sample: str) -> Path:
        return self.root / f"{sample}{RECORD_SUFFIX}"

    def scan(self, now: float) -> list[SampleRow]:
        """Read the spool at start (see the module docstring); the samples it holds. A
        spool that cannot be created or read is logged: the node serves on, and each
        sample it would keep is dropped (counted `disk`)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            return self._scan(now)
        except OSError as exc:
            log.error("node %s: samples: cannot use the spool %s: %s", self.node_id, self.root, exc)
            return []

    def _scan(self, now: float) -> list[SampleRow]:
        for tmp in self.root.glob(f"{TEMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
        index: dict[str, Spooled] = {}
        for path in sorted(self.root.glob(f"*{RECORD_SUFFIX}")):
            spooled = self._read(path)
            if spooled is None:
                self._quarantine(path)
            else:
                index[spooled.row.id] = spooled
        for png in self.root.glob("*.png"):
            if png.stem not in index and not self.record(png.stem).exists():
                log.info("node %s: samples: %s without a record removed", self.node_id, png.name)
                png.unlink(missing_ok=True)
        with self._lock:
            self._index = index
        self.expire(now)
        return [s.row for s in self._index.values()]

    def _read(self, path: Path) -> Spooled | None:
        sample = path.name[: -len(RECORD_SUFFIX)]
        try:
            row = SampleRow.model_validate_json(path.read_bytes())
            if row.id != sample:
                raise ValueError(f"its id is {row.id}")
            data = self.png(sample).read_bytes()
        except (OSError, ValueError, ValidationError) as exc:
            why = str(exc).splitlines()[0]
            log.error("node %s: samples: corrupt spool file %s: %s", self.node_id, path.name, why)
            return None
        if sample_id(data) != sample:
            log.error(
                "node %s: samples: corrupt spool file %s: its image does not hash to its id",
                self.node_id,
                path.name,
            )
            return None
        return Spooled(row, len(data))

    def _quarantine(self, record: Path) -> None:
        """Move a corrupt record and its image to corrupt/ (counted, never uploaded)."""
        self.lost["corrupt"] += 1
        bad = self.root / CORRUPT_DIR
        bad.mkdir(exist_ok=True, mode=0o700)
        sample = record.name[: -len(RECORD_SUFFIX)]
        for path in (record, self.png(sample)):
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, bad / path.name)

    def corrupt(self, sample: str) -> None:
        """A spooled sample found corrupt later (its image changed on disk)."""
        with self._lock:
            self._index.pop(sample, None)
        log.error("node %s: samples: corrupt spool file %s", self.node_id, sample[:12])
        self._quarantine(self.record(sample))

    def expire(self, now: float) -> None:
        """Delete samples older than the retention period."""
        with self._lock:
            old = [
                s.row.id
                for s in self._index.values()
                if s.row.collected_at.timestamp() <= now - self.retention_s
            ]
        for sample in old:
            self.remove(sample)
            self.lost["expired"] += 1
            log.info("node %s: samples: %s expired unsent", self.node_id, sample[:12])

    def put(self, png: bytes, row: SampleRow) -> bool:
        """Spool a sample (False: it is spooled already); SpoolFull past the quota,
        OSError if the disk refuses (nothing half-written is left)."""
        with self._lock:
            if row.id in self._index:
                return False
            used = sum(s.size for s in self._index.values())
            if used + len(png) > self.quota_bytes:
                raise SpoolFull(f"{used + len(png)} bytes is over the {self.quota_bytes}")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.png(row.id), png)
        try:
            _write_atomic(self.record(row.id), row.model_dump_json().encode())
        except OSError:
            self.png(row.id).unlink(missing_ok=True)
            raise
        with self._lock:
            self._index[row.id] = Spooled(row, len(png))
        return True

    def read_limits(self) -> dict[str, list[float]] | None:
        """The limits' times as last written (None: none, or unreadable: logged)."""
        path = self.root / LIMITS_FILE
        try:
            data = json.loads(path.read_bytes())
            return {
                SampleReason(k).value: [float(t) for t in v]
                for k, v in data.items()
                if isinstance(v, list)
            }
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error(
                "node %s: samples: %s unreadable (%s): limits start afresh", self.node_id, path, exc
            )
            return None

    def write_limits(self, taken: dict[str, list[float]]) -> None:
        try:
            _write_atomic(self.root / LIMITS_FILE, json.dumps(taken).encode())
        except OSError as exc:
            log.warning("node %s: samples: cannot write %s: %s", self.node_id, LIMITS_FILE, exc)

    def pending(self) -> list[Spooled]:
        """The spooled samples, oldest first."""
        with self._lock:
            return sorted(self._index.values(), key=lambda s: s.row.collected_at)

    def remove(self, sample: str) -> None:
        """Delete a sample (the record first: without it the image is an orphan)."""
        with self._lock:
            self._index.pop(sample, None)
        self.record(sample).unlink(missing_ok=True)
        self.png(sample).unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    "Spool",
    "SpoolFull",
    "encode_png",
    "spool_of",
]
