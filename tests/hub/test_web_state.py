"""What the fleet page reads, unit by unit: the bounded telemetry history, sparklines,
the database's upgrade to schema 2 and its read-only connection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cellwatch.hub.db import SCHEMA_VERSION, Database
from cellwatch.hub.errors import HubError
from cellwatch.hub.history import HISTORY_S, SLOT_S, SLOTS, TelemetryHistory
from cellwatch.hub.records import ModelRecord
from cellwatch.hub.registry import Registry, model_info
from cellwatch.hub.store import BundleStore
from cellwatch.hub.web.nodeviews import SPARK_H, SPARK_POINTS, spark
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.signing import TrustedKeys
from tests.helpers.fleetpage import telemetry
from tests.hub.conftest import Bundles
from tests.models import write_test_bundle


def test_history_keeps_an_hour_in_bounded_slots() -> None:
    h = TelemetryHistory()
    start = 1_000_000.0
    for i in range(3 * int(HISTORY_S)):  # three hours, one sample a second
        h.add(telemetry("n", throughput_ips=float(i % 10)), start + i)
    now = start + 3 * HISTORY_S
    s = h.samples("n", now)
    assert len(s) == SLOTS  # an hour of 5 s slots, no more
    assert s.ts[0] >= now - HISTORY_S and np.all(np.diff(s.ts) > 0)
    # each slot averages the samples that fell in it: 5 of 0..9 in turn
    assert set(np.round(s.series("throughput_ips"), 6)) <= {2.0, 7.0}
    assert h.samples("other", now).ts.size == 0
    assert set(h.all_samples(now)) == {"n"}


def test_history_forgets_what_is_older_than_an_hour() -> None:
    h = TelemetryHistory()
    h.add(telemetry("n"), 0.0)
    h.add(telemetry("n"), SLOT_S * 2)
    assert len(h.samples("n", HISTORY_S)) == 2
    assert len(h.samples("n", HISTORY_S + SLOT_S)) == 1
    assert len(h.samples("n", 3 * HISTORY_S)) == 0


def test_sparkline_points_scale_and_bounds() -> None:
    now = 10_000.0
    ts = np.arange(now - 3000, now, 5.0)
    values = np.linspace(0, 1e6, ts.size)  # huge but valid figures
    values[3] = np.nan  # never stored, but a NaN must not break a page
    s = spark(ts, values, now, "throughput", "img/s")
    points = [tuple(map(float, p.split(","))) for p in s.points.split()]
    assert len(points) == SPARK_POINTS
    assert all(0 <= x <= 120 and 0 <= y <= SPARK_H for x, y in points)
    assert points[-1][1] < points[0][1]  # rising values go up (SVG y grows downwards)
    assert s.peak == 1e6 and "1e+06" in s.title and "50 min" in s.title
    empty = spark(np.zeros(0), np.zeros(0), now, "throughput", "img/s")
    assert empty.points == "" and "no telemetry" in empty.title
    one = spark(np.array([now - 1]), np.array([3.0]), now, "x", "u")
    assert len(one.points.split()) == 2  # one sample is drawn as a short flat line


V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    manifest_sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    size INTEGER NOT NULL,
    precision TEXT NOT NULL,
    signer TEXT,
    metrics TEXT NOT NULL,
    created_at TEXT NOT NULL,
    pushed_at REAL NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    boot_id TEXT,
    since REAL,
    last_seen REAL,
    tags TEXT NOT NULL DEFAULT '[]',
    model_name TEXT,
    model_version TEXT,
    model_sha256 TEXT,
    model_at REAL NOT NULL DEFAULT 0,
    device TEXT,
    telemetry TEXT
);
CREATE TABLE IF NOT EXISTS rollouts (
    seq INTEGER PRIMARY KEY,
    rollout_id TEXT UNIQUE NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    target TEXT NOT NULL,
    waves TEXT NOT NULL,
    counts TEXT NOT NULL,
    advance_at REAL NOT NULL,
    max_failures TEXT NOT NULL,
    min_executed INTEGER NOT NULL,
    node_timeout_s REAL NOT NULL,
    state TEXT NOT NULL,
    wave INTEGER NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS targets (
    rollout_id TEXT NOT NULL REFERENCES rollouts (rollout_id),
    node_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    prev_name TEXT,
    prev_version TEXT,
    prev_sha256 TEXT,
    phase TEXT NOT NULL,
    state TEXT NOT NULL,
    progress REAL NOT NULL,
    error_code TEXT,
    error_message TEXT,
    issued_at REAL,
    clock_from REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    confirmed INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, node_id)
);
CREATE INDEX IF NOT EXISTS targets_node ON targets (node_id);
CREATE TABLE IF NOT EXISTS api_replies (
    request_id TEXT PRIMARY KEY,
    verb TEXT NOT NULL,
    reply TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
"""hub/db.py's schema 1, as the first hub wrote it (commit bf91315)."""


def v1_database(path: Path) -> None:
    """A schema 1 database as the first hub wrote it (no provenance, events, conflicts)."""
    with sqlite3.connect(path) as c:
        c.executescript(V1_SCHEMA)
        c.execute("PRAGMA user_version=1")


def test_a_schema_1_database_is_upgraded_and_badges_backfilled(
    bundles: Bundles, tmp_path: Path
) -> None:
    v1_database(tmp_path / "hub.db")
    store = BundleStore(tmp_path / "store")
    synthetic = write_test_bundle(
        tmp_path / "synthetic", bundles.keys, provenance={"synthetic": True}
    )
    bundle = load_bundle(synthetic, TrustedKeys.load(bundles.keys))
    sha = bundle.manifest_sha256
    target = store.bundles / sha
    target.mkdir(parents=True)
    for p in synthetic.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    with sqlite3.connect(tmp_path / "hub.db") as c:
        c.execute(
            "INSERT INTO models VALUES (?, 'toy', '1.0.0', 1, 'fp32', 'test', '{}', ?, 0)",
            (sha, bundle.manifest.created_at.isoformat()),
        )
    db = Database(tmp_path / "hub.db")
    assert db.models()[0].provenance == {}
    assert db.rollout_events("r1") == []
    Registry(db, store, TrustedKeys.load(bundles.keys), allow_unsigned=False)
    record = db.models()[0]
    assert record.provenance["synthetic"] is True
    assert model_info(record).synthetic is True
    with sqlite3.connect(tmp_path / "hub.db") as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_the_reader_connection_cannot_write(tmp_path: Path) -> None:
    writer = Database(tmp_path / "hub.db")
    reader = Database(tmp_path / "hub.db", readonly=True)
    record = ModelRecord("m", "1", "a" * 64, 1, "fp32", None, {}, "2026-01-01T00:00:00", 0.0)
    writer.add_model(record)
    assert [m.name for m in reader.models()] == ["m"]  # sees the writer's commits
    with pytest.raises(sqlite3.OperationalError):
        reader.add_model(record)
    reader.close()
    writer.close()
    with pytest.raises(HubError, match="cannot open"):
        Database(tmp_path / "missing.db", readonly=True)
