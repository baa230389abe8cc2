"""The hub database's tables (SQL) and the migrations from each earlier schema version
(hub/db.py applies them; SCHEMA_VERSION there is the current one)."""

from __future__ import annotations

SCHEMA = """
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
    provenance TEXT NOT NULL DEFAULT '{}',
    revoked_at REAL,
    revoke_reason TEXT,
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
    telemetry TEXT,
    conflict_at REAL,
    model_error TEXT,
    boots TEXT NOT NULL DEFAULT '[]'
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
    finished_at REAL,
    shadow TEXT
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
    shadow_state TEXT,
    shadow_error_code TEXT,
    shadow_error_message TEXT,
    PRIMARY KEY (rollout_id, node_id)
);
CREATE TABLE IF NOT EXISTS shadow_windows (
    rollout_id TEXT NOT NULL REFERENCES rollouts (rollout_id),
    node_id TEXT NOT NULL,
    window_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    n INTEGER NOT NULL,
    agreements INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    window TEXT NOT NULL,
    PRIMARY KEY (rollout_id, node_id, window_id)
);
CREATE INDEX IF NOT EXISTS targets_node ON targets (node_id);
CREATE TABLE IF NOT EXISTS rollout_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL REFERENCES rollouts (rollout_id),
    ts REAL NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, seq);
CREATE TABLE IF NOT EXISTS served (
    node_id TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (node_id, manifest_sha256)
);
CREATE TABLE IF NOT EXISTS revocations (
    manifest_sha256 TEXT PRIMARY KEY,
    revocation TEXT NOT NULL,
    stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    collected_at REAL NOT NULL,
    stored_at REAL NOT NULL,
    label TEXT
);
CREATE TABLE IF NOT EXISTS api_replies (
    request_id TEXT PRIMARY KEY,
    verb TEXT NOT NULL,
    reply TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
MIGRATIONS = {
    # schema 1 -> 2: the manifest's provenance (badges), rollout events (CREATE above)
    1: "ALTER TABLE models ADD COLUMN provenance TEXT NOT NULL DEFAULT '{}';",
    # schema 2 -> 3: when two processes with one node id were last seen
    2: "ALTER TABLE nodes ADD COLUMN conflict_at REAL;",
    # schema 3 -> 4: revocations, why a node serves no or an earlier model, and the
    # bundle bytes served (the `served` table: CREATE above)
    3: "ALTER TABLE models ADD COLUMN revoked_at REAL; "
    "ALTER TABLE models ADD COLUMN revoke_reason TEXT; "
    "ALTER TABLE nodes ADD COLUMN model_error TEXT;",
    # schema 4 -> 5: signed revocations (the `revocations` table: CREATE above), and
    # the earlier boots of each node in the order the hub heard of them
    4: "ALTER TABLE nodes ADD COLUMN boots TEXT NOT NULL DEFAULT '[]';",
    # schema 5 -> 6: shadow phases (the rollout's policy and outcome, each target's
    # shadow state; the `shadow_windows` table: CREATE above)
    5: "ALTER TABLE rollouts ADD COLUMN shadow TEXT; "
    "ALTER TABLE targets ADD COLUMN shadow_state TEXT; "
    "ALTER TABLE targets ADD COLUMN shadow_error_code TEXT; "
    "ALTER TABLE targets ADD COLUMN shadow_error_message TEXT;",
}
