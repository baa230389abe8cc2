"""The hub's read-only answers (models, nodes, stats, rollouts), one code path for the
MQTT API (`cellwatch-hub ... --json`) and the HTTP `/api/...`: both print exactly
these models, through `as_json`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.registry import model_info
from cellwatch.hub.rolloutinfo import describe
from cellwatch.hub.served import ServedTotals
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.hubapi import ModelsReply, NodesReply, RolloutInfo, RolloutList, StatsReply


def as_json(data: BaseModel | dict[str, Any]) -> str:
    """The JSON text `--json` prints and `/api/...` serves."""
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    return json.dumps(payload, indent=2)


class Queries:
    def __init__(
        self, db: Database, fleet: Fleet, served: ServedTotals, started_at: datetime
    ) -> None:
        self.db = db
        self.fleet = fleet
        self.served = served
        self.started_at = started_at

    def models(self, name: str | None = None) -> ModelsReply:
        return ModelsReply(models=[model_info(m) for m in self.db.models(name)])

    def nodes(self, now: float) -> NodesReply:
        return NodesReply(
            nodes=self.fleet.infos(self.served.served_by_node(), now),
            sites=self.fleet.sites.infos(),
        )

    def stats(self) -> StatsReply:
        by_node = self.served.served_by_node()
        return StatsReply(
            started_at=self.started_at,
            fetch_requests=self.served.requests,
            fetch_errors=self.served.errors,
            bytes_served=sum(by_node.values()),
            bytes_by_node=by_node,
            bytes_by_bundle=self.served.served_by_bundle(),
            bytes_by_node_bundle=self.served.served(),
        )

    def rollout(self, rollout_id: str | None) -> RolloutInfo:
        """As stored (the orchestrator stores every change); the latest without an id."""
        if rollout_id is None:
            latest = self.db.rollouts(limit=1)
            if not latest:
                raise ApiFailure(ApiErrorCode.NOT_FOUND, "no rollout yet")
            return describe(latest[0])
        rid = rollout_id if rollout_id.startswith("r") else f"r{rollout_id}"
        r = self.db.rollout(rid)
        if r is None:
            raise ApiFailure(ApiErrorCode.NOT_FOUND, f"no rollout {rollout_id!r}")
        return describe(r)

    def rollouts(self, limit: int = 50) -> RolloutList:
        return RolloutList(rollouts=[describe(r) for r in self.db.rollouts(limit=limit)])

    def active_and_recent(self, recent: int) -> tuple[list[RolloutInfo], list[RolloutInfo]]:
        """(every active rollout, the `recent` latest finished ones), newest first."""
        active = [describe(r) for r in self.db.rollouts(active_only=True, limit=10_000)]
        ids = {r.rollout_id for r in active}
        latest = self.db.rollouts(limit=recent + len(active))
        return active, [describe(r) for r in latest if r.rollout_id not in ids][:recent]
