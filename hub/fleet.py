"""Fleet tracking: what each node runs and whether it is online, from the retained
status topics, telemetry and update reports (DESIGN.md, Topics).

Which of a node's processes is the newest is the hub's own receive order, never the
node's clock (its `since` may be a day off): each node record keeps the boot ids
the hub heard of before the current one (at most KEPT_BOOTS). A status of a new
boot id is the node's newest process. A status of an earlier boot is a late Will of
a process that was replaced: it is ignored. An `online` status of an earlier boot
is no late Will: a second process runs with the same node id, and the node is
shown `conflict` until CONFLICT_HOLD_S after the last such sign (the two take the
broker session from each other; each node process backs off and the one that
loses exits with code 4). An offline status keeps the model last known (a Will is
written before a model is loaded).

A node is shown `stale` when its last status said online but nothing came from it
(status, telemetry, update report) for STALE_AFTER_INTERVALS of its telemetry
intervals: computed when asked, from last_seen, with no timer. A node whose status
names a site whose link to the central broker is down is shown `unreachable`, and the
rollout engine sees it as not online (hub/sites.py). Telemetry also feeds the
in-memory history of the fleet page's sparklines (hub/history.py).

The control thread's Fleet keeps every node's record in memory as well (written
through to the database), so the rollout engine's view of 2,000 nodes costs no query;
it tracks at most `max_nodes` node ids (the messages of others are refused). A
reader's Fleet (the HTTP server) only queries the database. Telemetry alone (a known
node's figures and last_seen) is not written through: `flush`, each control tick
(`tick_s`), writes every record it changed in one transaction, so 10,000 nodes'
telemetry costs one commit a second, not one per message; a reader sees it at most
a tick late, and a hub killed loses at most a tick of it (QoS 0: the next comes
within `telemetry_interval_s`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime

from pydantic import ValidationError

from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.history import TelemetryHistory
from cellwatch.hub.records import NodeRecord
from cellwatch.hub.sites import Sites
from cellwatch.hub.targets import NodeView
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.drift import DriftFigures
from cellwatch.shared.hubapi import NodeInfo
from cellwatch.shared.limits import (
    CONFLICT_HOLD_S,
    DEFAULT_TELEMETRY_INTERVAL_S,
    STALE_AFTER_INTERVALS,
)
from cellwatch.shared.schemas import ModelError, ModelRef, NodeStatus, Telemetry, UpdateReport
from cellwatch.shared.states import NodeState, UpdateState
from cellwatch.shared.topics import is_valid_name

log = logging.getLogger(__name__)

KEPT_BOOTS = 16
"""Earlier boot ids kept per node: a late message of an older process than these is
taken for a new process (it cannot happen: a Will comes within seconds)."""


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def telemetry_interval(rec: NodeRecord) -> float:
    """The node's telemetry period: its last Telemetry's window_s, or the default."""
    window = (rec.telemetry or {}).get("window_s")
    return (
        float(window)
        if isinstance(window, int | float) and window > 0
        else (DEFAULT_TELEMETRY_INTERVAL_S)
    )


def node_state(rec: NodeRecord, now: float) -> NodeState:
    """What the hub says of the node at `now` (see the module docstring)."""
    if rec.state is NodeState.CONFLICT:
        return NodeState.CONFLICT
    if rec.state is not NodeState.ONLINE:
        return NodeState.OFFLINE
    if rec.conflict_at is not None and now - rec.conflict_at < CONFLICT_HOLD_S:
        return NodeState.CONFLICT
    silent = now - rec.last_seen if rec.last_seen is not None else 0.0
    if silent > STALE_AFTER_INTERVALS * telemetry_interval(rec):
        return NodeState.STALE
    return NodeState.ONLINE


class Fleet:
    def __init__(
        self,
        db: Database,
        history: TelemetryHistory | None = None,
        *,
        max_nodes: int | None = None,
        sites: Sites | None = None,
    ) -> None:
        self.db = db
        self.history = history if history is not None else TelemetryHistory()
        self.max_nodes = max_nodes
        self.sites = sites if sites is not None else Sites()
        self._records: dict[str, NodeRecord] | None = None
        self._unsaved: dict[str, NodeRecord] = {}
        """Records only telemetry changed since the last `flush` (the control thread's
        tick writes them in one transaction)."""

    # -- the control thread's records -------------------------------------------------
    def _all(self) -> dict[str, NodeRecord]:
        if self._records is None:
            self._records = {n.node_id: n for n in self.db.nodes()}
        return self._records

    def _record(self, node_id: str, state: NodeState = NodeState.OFFLINE) -> NodeRecord | None:
        """node_id's record (a new one if unknown); None when max_nodes are tracked."""
        rec = self._all().get(node_id)
        if rec is not None:
            return rec
        if self.max_nodes is not None and len(self._all()) >= self.max_nodes:
            log.warning(
                "node %s: ignored: the hub already tracks limits.max_nodes = %d nodes",
                node_id,
                self.max_nodes,
            )
            return None
        return NodeRecord(node_id, state=state)

    def _save(self, rec: NodeRecord) -> None:
        """Store rec, then keep it (a failed store changes nothing in memory)."""
        self.db.save_node(rec)
        self._all()[rec.node_id] = rec
        self._unsaved.pop(rec.node_id, None)

    def flush(self) -> int:
        """Write the records telemetry changed since the last flush, in one transaction;
        how many. Raises the database's error (the records stay to be written)."""
        if not self._unsaved:
            return 0
        records = list(self._unsaved.values())
        self.db.save_nodes(records)
        self._unsaved.clear()
        return len(records)

    def model_of(self, node_id: str) -> ModelRef | None:
        rec = self._all().get(node_id)
        return rec.model if rec is not None else None

    def on_status(self, status: NodeStatus, now: float) -> bool | None:
        """Record a status; False if it was a stale one (older boot) and ignored, None
        if the node is one too many (max_nodes)."""
        found = self._record(status.node_id)
        if found is None:
            return None
        rec = replace(found, boots=list(found.boots))
        since = status.since.timestamp()
        if status.boot_id != rec.boot_id and status.boot_id in rec.boots:
            if status.state is NodeState.ONLINE:
                rec.conflict_at = rec.last_seen = now
                self._save(rec)
                log.warning(
                    "node %s: process %s says it is online after process %s started: two "
                    "processes use this node id",
                    status.node_id,
                    status.boot_id[:8],
                    (rec.boot_id or "")[:8],
                )
                return False
            log.info(
                "node %s: ignoring a stale %s status of boot %s (current boot %s)",
                status.node_id,
                status.state,
                status.boot_id[:8],
                (rec.boot_id or "")[:8],
            )
            return False
        if rec.boot_id is not None and status.boot_id != rec.boot_id:
            rec.boots = [*rec.boots, rec.boot_id][-KEPT_BOOTS:]
        rec.state, rec.boot_id, rec.since, rec.last_seen = status.state, status.boot_id, since, now
        self.sites.on_node(status.node_id, status.site)
        rec.tags = list(status.tags)
        rec.device = status.device or rec.device
        if status.state is NodeState.ONLINE:  # a Will (offline) was written before any error
            rec.model_error = (
                status.model_error.model_dump(mode="json") if status.model_error else None
            )
        if status.state is NodeState.ONLINE or status.model is not None:
            rec.model = status.model
            rec.model_at = now
        self._save(rec)
        log.info(
            "node %s: %s (boot %s, model %s)",
            status.node_id,
            status.state,
            status.boot_id[:8],
            rec.model or "none",
        )
        return True

    def on_telemetry(self, t: Telemetry, now: float) -> bool:
        """Record telemetry; False if the node is one too many (max_nodes)."""
        found = self._record(t.node_id, state=NodeState.ONLINE)
        if found is None:
            return False
        rec = replace(found, telemetry=t.model_dump(mode="json", by_alias=True), last_seen=now)
        if t.node_id in self._all():  # kept in memory, written at the next flush
            self._all()[t.node_id] = rec
            self._unsaved[t.node_id] = rec
        else:  # a node the hub hears of first by its telemetry
            self._save(rec)
        self.history.add(t, now)
        return True

    def on_update(self, node_id: str, report: UpdateReport, now: float) -> bool:
        """Record what a report says of the node; False if it is one too many."""
        found = self._record(node_id, state=NodeState.ONLINE)
        if found is None:
            return False
        rec = replace(found, last_seen=now)
        if report.state is UpdateState.ACTIVE:
            rec.model, rec.model_at = report.model, now
        self._save(rec)
        return True

    def views(self) -> dict[str, NodeView]:
        out = {}
        for n in self._all().values():
            reachable = self.sites.reachable(n.node_id)
            out[n.node_id] = NodeView(
                online=n.state is NodeState.ONLINE and reachable,
                model=n.model,
                model_at=n.model_at,
                reachable=reachable,
            )
        return out

    def resolve(self, target: str) -> list[str]:
        """Node ids for `all`, `group:G` or `node:ID,ID` (sorted); ApiFailure if none."""
        known = self._all()
        if target == "all":
            ids = sorted(known)
            if not ids:
                raise ApiFailure(
                    ApiErrorCode.NOT_FOUND, "the hub knows no nodes yet (none has connected)"
                )
            return ids
        kind, _, rest = target.partition(":")
        if kind == "group" and rest:
            ids = sorted(i for i, n in known.items() if rest in n.tags)
            if not ids:
                raise ApiFailure(ApiErrorCode.NOT_FOUND, f"no node has the tag {rest!r}")
            return ids
        if kind == "node" and rest:
            ids = sorted({i.strip() for i in rest.split(",") if i.strip()})
            bad = [i for i in ids if not is_valid_name(i)]
            if bad or not ids:
                raise ApiFailure(ApiErrorCode.BAD_REQUEST, f"invalid node id(s) in target: {bad}")
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise ApiFailure(
                    ApiErrorCode.NOT_FOUND,
                    f"unknown node(s) {', '.join(unknown)}: never seen by the hub",
                )
            return ids
        raise ApiFailure(
            ApiErrorCode.BAD_REQUEST, f"target {target!r}: use all, group:GROUP or node:ID[,ID...]"
        )

    def infos(self, bytes_by_node: dict[str, int], now: float) -> list[NodeInfo]:
        return [
            NodeInfo(
                node_id=n.node_id,
                state=node_state(n, now)
                if self.sites.reachable(n.node_id)
                else NodeState.UNREACHABLE,
                site=self.sites.site_of(n.node_id),
                boot_id=n.boot_id,
                since=_ts(n.since),
                last_seen=_ts(n.last_seen),
                tags=n.tags,
                model=n.model,
                device=n.device,
                telemetry=n.telemetry,
                bytes_served=bytes_by_node.get(n.node_id, 0),
                model_error=ModelError.model_validate(n.model_error) if n.model_error else None,
                drift=_drift(n),
                shares_1h=self.history.label_shares(n.node_id, now),
            )
            for n in self.db.nodes()
        ]


def _drift(rec: NodeRecord) -> DriftFigures | None:
    """The drift figures of the node's last telemetry (None: none, or unreadable)."""
    figures = (rec.telemetry or {}).get("drift")
    if not isinstance(figures, dict):
        return None
    try:
        return DriftFigures.model_validate(figures)
    except ValidationError:
        log.debug("node %s: stored drift figures not readable: skipped", rec.node_id)
        return None
