"""The node's spool of field samples: what node/samples.py keeps until the hub has it.

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
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from cellwatch.shared.samples import SampleReason, SampleRow, sample_file_name, sample_id

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
CORRUPT_DIR = "corrupt"
LIMITS_FILE = "limits.state"
"""The times each reason's limits counted in the last 24 hours (JSON), so that a restart
does not start the limits afresh."""


class SpoolFull(Exception):
    """The sample would take the spool over its quota."""


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
