"""The hub's SQLite database (WAL): models, nodes, rollouts, their targets and
events, the windows of shadow phases (each stored once: its id is unique per node
process and window), and the replies of mutating API calls (so a repeated request_id
gets the same answer).

Times are seconds since the epoch (REAL). One connection, guarded by a lock; every
write is one transaction. The HTTP server reads through a read-only connection of
its own (`Database(path, readonly=True)`): WAL readers never wait for the writer.
The tables and migrations are hub/schema.py; the rows as values, hub/records.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cellwatch.hub.errors import HubError
from cellwatch.hub.records import (
    ModelRecord,
    NodeRecord,
    RolloutEvent,
    TargetRecord,
    code_of,
    model_of,
    node_of,
    node_row,
    ref_of,
)
from cellwatch.hub.rollout import Rollout
from cellwatch.hub.schema import MIGRATIONS, SCHEMA
from cellwatch.hub.shadowing import ShadowPhase, WindowFacts
from cellwatch.hub.targets import Target
from cellwatch.shared.hubapi import RolloutPolicy, ShadowPolicy
from cellwatch.shared.samples import SampleRow
from cellwatch.shared.schemas import Revocation, ShadowWindow
from cellwatch.shared.states import (
    ACTIVE_ROLLOUT_STATES,
    RolloutState,
    ShadowState,
    TargetPhase,
    UpdateState,
)

SCHEMA_VERSION = 6
REPLY_RETENTION_S = 7 * 24 * 3600
BUSY_TIMEOUT_S = 2.0
"""How long a write waits for a lock another connection holds before it fails (the
control thread then takes the database for unwritable for a while: hub/control.py)."""


class Database:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """Open (and create or migrate) the database; `readonly`: a reader of a database
        a hub already opened (no schema changes, no writes)."""
        try:
            if readonly:
                self._conn = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    check_same_thread=False,
                    isolation_level=None,
                )
                self._conn.execute("PRAGMA query_only=ON")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(
                    path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
                )
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.row_factory = sqlite3.Row
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION or (readonly and version != SCHEMA_VERSION):
                raise HubError(f"{path} has schema {version}; this hub knows {SCHEMA_VERSION}")
            if not readonly:
                self._migrate(version)
        except sqlite3.Error as exc:
            raise HubError(f"cannot open the hub database {path}: {exc}") from exc
        self._lock = threading.RLock()
        self.commits = 0
        """Write transactions committed since start (/metrics: the hub's write rate)."""

    def _migrate(self, version: int) -> None:
        if version:  # an existing database: bring it up to date first
            for step in range(version, SCHEMA_VERSION):
                self._conn.executescript(MIGRATIONS[step])
        self._conn.executescript(SCHEMA)
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self.commits += 1

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, args).fetchall())

    # -- field samples (hub/samples.py) ------------------------------------------------
    def add_sample(self, row: SampleRow, size: int, stored_at: float) -> bool:
        """Record a stored sample; False: its id was recorded before (one sample)."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO samples (id, record, reason, source, size, collected_at, "
                "stored_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.id,
                    row.model_copy(update={"label": None}).model_dump_json(),
                    row.reason.value,
                    row.source,
                    size,
                    row.collected_at.timestamp(),
                    stored_at,
                ),
            )
            return cur.rowcount == 1

    def has_sample(self, sample: str) -> bool:
        return bool(self._rows("SELECT 1 FROM samples WHERE id = ?", sample))

    def samples(self, reason: str | None = None, source: str | None = None) -> list[SampleRow]:
        """The samples (with their label, if imported), oldest first."""
        rows = self._rows(
            "SELECT record, label FROM samples WHERE (? IS NULL OR reason = ?) "
            "AND (? IS NULL OR source = ?) ORDER BY collected_at, id",
            reason,
            reason,
            source,
            source,
        )
        return [
            SampleRow.model_validate_json(r["record"]).model_copy(update={"label": r["label"]})
            for r in rows
        ]

    def sample_bytes(self) -> int:
        return int(self._rows("SELECT COALESCE(SUM(size), 0) AS n FROM samples")[0]["n"])

    def sample_counts(self) -> list[tuple[str, str, int, int]]:
        """(reason, source, samples, of them labelled) per reason and source."""
        rows = self._rows(
            "SELECT reason, source, COUNT(*) AS n, COUNT(label) AS labelled FROM samples "
            "GROUP BY reason, source ORDER BY reason, source"
        )
        return [(r["reason"], r["source"], r["n"], r["labelled"]) for r in rows]

    def samples_collected_before(self, before: float) -> list[str]:
        return [
            r["id"] for r in self._rows("SELECT id FROM samples WHERE collected_at < ?", before)
        ]

    def delete_samples(self, ids: list[str]) -> None:
        with self._tx() as c:
            c.executemany("DELETE FROM samples WHERE id = ?", [(i,) for i in ids])

    def set_labels(self, labels: dict[str, str]) -> None:
        """Every label at once (one transaction)."""
        with self._tx() as c:
            c.executemany(
                "UPDATE samples SET label = ? WHERE id = ?", [(v, k) for k, v in labels.items()]
            )

    # -- models ------------------------------------------------------------------------
    def add_model(self, m: ModelRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO models (manifest_sha256, name, version, size, precision, "
                "signer, metrics, created_at, pushed_at, provenance) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    m.manifest_sha256,
                    m.name,
                    m.version,
                    m.size,
                    m.precision,
                    m.signer,
                    json.dumps(m.metrics),
                    m.created_at,
                    m.pushed_at,
                    json.dumps(m.provenance),
                ),
            )

    def revoke_model(self, sha: str, reason: str, now: float) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE models SET revoked_at = ?, revoke_reason = ? WHERE manifest_sha256 = ?",
                (now, reason, sha),
            )

    def add_revocation(self, rev: Revocation, now: float) -> bool:
        """Store a (verified) revocation and mark its model revoked; False if one for
        that bundle was stored already (the first one stays)."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO revocations VALUES (?, ?, ?)",
                (rev.manifest_sha256, rev.model_dump_json(by_alias=True), now),
            )
            if cur.rowcount == 0:
                return False
            c.execute(
                "UPDATE models SET revoked_at = ?, revoke_reason = ? "
                "WHERE manifest_sha256 = ? AND revoked_at IS NULL",
                (rev.revoked_at.timestamp(), rev.reason, rev.manifest_sha256),
            )
        return True

    def revocations(self) -> list[Revocation]:
        """The signed revocations, in the order they were stored."""
        rows = self._rows("SELECT revocation FROM revocations ORDER BY stored_at, rowid")
        return [Revocation.model_validate_json(r["revocation"]) for r in rows]

    def set_signer(self, sha: str, signer: str | None) -> None:
        with self._tx() as c:
            c.execute("UPDATE models SET signer = ? WHERE manifest_sha256 = ?", (signer, sha))

    def revoked_models(self) -> list[ModelRecord]:
        rows = self._rows("SELECT * FROM models WHERE revoked_at IS NOT NULL ORDER BY revoked_at")
        return [model_of(r) for r in rows]

    def set_provenance(self, sha: str, provenance: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE models SET provenance = ? WHERE manifest_sha256 = ?",
                (json.dumps(provenance), sha),
            )

    def model(self, name: str, version: str) -> ModelRecord | None:
        rows = self._rows("SELECT * FROM models WHERE name = ? AND version = ?", name, version)
        return model_of(rows[0]) if rows else None

    def model_by_sha(self, sha: str) -> ModelRecord | None:
        rows = self._rows("SELECT * FROM models WHERE manifest_sha256 = ?", sha)
        return model_of(rows[0]) if rows else None

    def models(self, name: str | None = None) -> list[ModelRecord]:
        if name is None:
            rows = self._rows("SELECT * FROM models ORDER BY name, pushed_at")
        else:
            rows = self._rows("SELECT * FROM models WHERE name = ? ORDER BY pushed_at", name)
        return [model_of(r) for r in rows]

    # -- nodes -------------------------------------------------------------------------
    def node(self, node_id: str) -> NodeRecord | None:
        rows = self._rows("SELECT * FROM nodes WHERE node_id = ?", node_id)
        return node_of(rows[0]) if rows else None

    def node_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM nodes")[0][0])

    def nodes(self) -> list[NodeRecord]:
        return [node_of(r) for r in self._rows("SELECT * FROM nodes ORDER BY node_id")]

    def save_node(self, n: NodeRecord) -> None:
        self.save_nodes([n])

    def save_nodes(self, nodes: list[NodeRecord]) -> None:
        """Store these node records in one transaction."""
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [node_row(n) for n in nodes],
            )

    # -- rollouts ----------------------------------------------------------------------
    def next_rollout_id(self) -> str:
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'rollout_seq'").fetchone()
            seq = int(row[0]) + 1 if row else 1
            c.execute("INSERT OR REPLACE INTO meta VALUES ('rollout_seq', ?)", (str(seq),))
        return f"r{seq}"

    def save_rollout(self, r: Rollout, events: list[str] | None = None, now: float = 0.0) -> None:
        """Store the rollout, its targets that changed (Target.dirty) and append events
        (at now) in one transaction; the targets are clean once it committed."""
        p = r.policy
        seq = int(r.rollout_id[1:]) if r.rollout_id[1:].isdigit() else None
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO rollouts VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    r.rollout_id,
                    r.model.name,
                    r.model.version,
                    r.model.manifest_sha256,
                    r.target,
                    p.waves,
                    json.dumps(list(r.plan)),
                    p.advance_at,
                    p.max_failures,
                    p.min_executed,
                    p.node_timeout_s,
                    r.state.value,
                    r.wave,
                    r.reason,
                    r.created_at,
                    r.updated_at,
                    r.finished_at,
                    _shadow_json(r.shadow),
                ),
            )
            changed = [(position, t) for position, t in enumerate(r.targets) if t.dirty]
            for position, t in changed:
                prev = t.previous
                c.execute(
                    "INSERT OR REPLACE INTO targets VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.rollout_id,
                        t.node_id,
                        position,
                        t.wave,
                        prev.name if prev else None,
                        prev.version if prev else None,
                        prev.manifest_sha256 if prev else None,
                        t.phase.value,
                        t.state.value,
                        t.progress,
                        t.error_code,
                        t.error_message,
                        t.issued_at,
                        t.clock_from,
                        t.finished_at,
                        t.updated_at,
                        int(t.confirmed),
                        t.shadow_state.value if t.shadow_state else None,
                        t.shadow_error_code,
                        t.shadow_error_message,
                    ),
                )
            c.executemany(
                "INSERT INTO rollout_events (rollout_id, ts, text) VALUES (?, ?, ?)",
                [(r.rollout_id, now, text) for text in events or ()],
            )
        for _, t in changed:
            t.dirty = False

    def rollout_events(self, rollout_id: str) -> list[RolloutEvent]:
        rows = self._rows(
            "SELECT ts, text FROM rollout_events WHERE rollout_id = ? ORDER BY seq", rollout_id
        )
        return [RolloutEvent(r["ts"], r["text"]) for r in rows]

    def rollout_states(self) -> dict[str, int]:
        """Number of rollouts in each state."""
        rows = self._rows("SELECT state, count(*) AS n FROM rollouts GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def targets_of(self, node_id: str, limit: int = 20) -> list[TargetRecord]:
        """The node's part in its latest rollouts, newest first."""
        rows = self._rows(
            "SELECT t.*, r.model_name, r.model_version, r.model_sha256 FROM targets t "
            "JOIN rollouts r USING (rollout_id) WHERE t.node_id = ? ORDER BY r.seq DESC LIMIT ?",
            node_id,
            limit,
        )
        return [
            TargetRecord(
                rollout_id=t["rollout_id"],
                model=ref_of(t["model_name"], t["model_version"], t["model_sha256"]),
                phase=TargetPhase(t["phase"]),
                state=UpdateState(t["state"]),
                progress=t["progress"],
                error_code=code_of(t["error_code"]),
                error_message=t["error_message"],
                updated_at=t["updated_at"],
            )
            for t in rows
        ]

    def last_desired(self) -> dict[str, tuple[str, str]]:
        """node_id -> (rollout_id, manifest sha256) of the desired model last issued to
        it: its retained desired, from the newest rollout that issued it one (the
        previous model for a target rolled back, the rollout's model otherwise)."""
        rows = self._rows(
            "SELECT t.node_id, t.rollout_id, t.phase, t.prev_sha256, r.model_sha256, r.seq "
            "FROM targets t JOIN rollouts r USING (rollout_id) "
            "WHERE t.issued_at IS NOT NULL ORDER BY r.seq"
        )
        out: dict[str, tuple[str, str]] = {}
        for row in rows:  # the newest rollout last: it wins
            rollback = row["phase"] == TargetPhase.ROLLBACK
            sha = row["prev_sha256"] if rollback else row["model_sha256"]
            if sha is not None:
                out[row["node_id"]] = (row["rollout_id"], sha)
        return out

    def rollout(self, rollout_id: str) -> Rollout | None:
        rows = self._rows("SELECT * FROM rollouts WHERE rollout_id = ?", rollout_id)
        return self._rollout(rows[0]) if rows else None

    def rollouts(self, *, active_only: bool = False, limit: int = 50) -> list[Rollout]:
        """Newest first."""
        states = sorted(ACTIVE_ROLLOUT_STATES) if active_only else []
        where = f"WHERE state IN ({', '.join('?' * len(states))})" if states else ""
        rows = self._rows(
            f"SELECT * FROM rollouts {where} ORDER BY seq DESC LIMIT ?", *states, limit
        )
        return [self._rollout(r) for r in rows]

    def _rollout(self, row: sqlite3.Row) -> Rollout:
        targets = [
            Target(
                node_id=t["node_id"],
                wave=t["wave"],
                previous=ref_of(t["prev_name"], t["prev_version"], t["prev_sha256"])
                if t["prev_sha256"]
                else None,
                phase=TargetPhase(t["phase"]),
                state=UpdateState(t["state"]),
                progress=t["progress"],
                error_code=code_of(t["error_code"]),
                error_message=t["error_message"],
                issued_at=t["issued_at"],
                clock_from=t["clock_from"],
                finished_at=t["finished_at"],
                updated_at=t["updated_at"],
                confirmed=bool(t["confirmed"]),
                shadow_state=ShadowState(t["shadow_state"]) if t["shadow_state"] else None,
                shadow_error_code=code_of(t["shadow_error_code"]),
                shadow_error_message=t["shadow_error_message"],
            )
            for t in self._rows(
                "SELECT * FROM targets WHERE rollout_id = ? ORDER BY position", row["rollout_id"]
            )
        ]
        for t in targets:
            t.dirty = False  # as stored
        shadow = self._shadow(row["rollout_id"], row["shadow"])
        return Rollout(
            rollout_id=row["rollout_id"],
            model=ref_of(row["model_name"], row["model_version"], row["model_sha256"]),
            target=row["target"],
            policy=RolloutPolicy.model_validate({k: row[k] for k in RolloutPolicy.model_fields}),
            plan=tuple(json.loads(row["counts"])),
            targets=targets,
            created_at=row["created_at"],
            state=RolloutState(row["state"]),
            wave=row["wave"],
            reason=row["reason"],
            updated_at=row["updated_at"],
            finished_at=row["finished_at"],
            shadow=shadow,
        )

    # -- shadow phases ----------------------------------------------------------------------
    def add_shadow_window(
        self, rollout_id: str, node_id: str, window: ShadowWindow, now: float
    ) -> bool:
        """Store a window of node_id's shadow report; False when it was stored before
        (the same window id again: a redelivery, a node that sent it twice)."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO shadow_windows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout_id,
                    node_id,
                    window.window_id,
                    now,
                    window.n,
                    window.agreements,
                    window.skipped,
                    window.model_dump_json(by_alias=True),
                ),
            )
            return cur.rowcount == 1

    def shadow_totals(self) -> list[tuple[str, str, int, int, int]]:
        """(rollout_id, node_id, images, agreements, skipped) of every stored window,
        summed per rollout and node (/metrics)."""
        rows = self._rows(
            "SELECT rollout_id, node_id, sum(n) AS n, sum(agreements) AS k, "
            "sum(skipped) AS skipped FROM shadow_windows GROUP BY rollout_id, node_id "
            "ORDER BY rollout_id, node_id"
        )
        return [(r["rollout_id"], r["node_id"], r["n"], r["k"], r["skipped"]) for r in rows]

    def _shadow(self, rollout_id: str, stored: str | None) -> ShadowPhase | None:
        """A rollout's shadow phase with its evidence: every stored window, in order."""
        if not stored:
            return None
        data = json.loads(stored)
        phase = ShadowPhase(
            ShadowPolicy.model_validate(data["policy"]),
            started_at=data["started_at"],
            ended_at=data.get("ended_at"),
            outcome=data.get("outcome"),
        )
        rows = self._rows(
            "SELECT node_id, received_at, window FROM shadow_windows WHERE rollout_id = ? "
            "ORDER BY received_at, rowid",
            rollout_id,
        )
        for r in rows:
            phase.add(
                r["node_id"],
                window_facts(ShadowWindow.model_validate_json(r["window"]), r["received_at"]),
            )
        return phase

    # -- bundle bytes served ----------------------------------------------------------------
    def served(self) -> dict[str, dict[str, int]]:
        """Bundle bytes sent, as last stored: node_id -> manifest sha256 -> bytes."""
        out: dict[str, dict[str, int]] = {}
        for r in self._rows("SELECT node_id, manifest_sha256, bytes FROM served"):
            out.setdefault(r["node_id"], {})[r["manifest_sha256"]] = r["bytes"]
        return out

    def save_served(self, totals: dict[str, dict[str, int]]) -> None:
        """Store these totals (rows not named are kept)."""
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO served VALUES (?, ?, ?)",
                [(n, sha, b) for n, per in totals.items() for sha, b in per.items()],
            )

    # -- idempotent API replies -----------------------------------------------------------
    def reply(self, request_id: str) -> tuple[str, str] | None:
        """(verb, reply JSON) stored for request_id, if any."""
        rows = self._rows("SELECT verb, reply FROM api_replies WHERE request_id = ?", request_id)
        return (rows[0]["verb"], rows[0]["reply"]) if rows else None

    def save_reply(self, request_id: str, verb: str, reply: str, now: float) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO api_replies VALUES (?, ?, ?, ?)",
                (request_id, verb, reply, now),
            )
            c.execute("DELETE FROM api_replies WHERE created_at < ?", (now - REPLY_RETENTION_S,))


def window_facts(w: ShadowWindow, received_at: float) -> WindowFacts:
    """What a window adds to its phase's evidence (hub/shadowing.py)."""
    a, c = w.active_ms, w.candidate_ms
    return WindowFacts(
        n=w.n,
        agreements=w.agreements,
        skipped=w.skipped,
        confusion=w.confusion,
        mean_abs_dp=w.mean_abs_dp,
        max_abs_dp=w.max_abs_dp,
        active_p50=a.p50 if a else None,
        active_p99=a.p99 if a else None,
        candidate_p50=c.p50 if c else None,
        candidate_p99=c.p99 if c else None,
        disagreements=tuple(w.disagreements),
        received_at=received_at,
    )


def _shadow_json(s: ShadowPhase | None) -> str | None:
    if s is None:
        return None
    return json.dumps(
        {
            "policy": s.policy.model_dump(mode="json"),
            "started_at": s.started_at,
            "ended_at": s.ended_at,
            "outcome": s.outcome,
        }
    )
