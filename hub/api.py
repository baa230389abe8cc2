"""The hub API: verb dispatch for `cellwatch/hub/api/{verb}` (DESIGN.md, Topics).

Every request is an ApiRequest (validated and capped by the API's route, hub/intake.py)
whose args validate against the verb's model (shared/hubapi.py); every answer is an
ApiReply. A mutating verb's successful reply
is stored under its request_id: the same request again (a client retry) gets the
same reply and does nothing twice.

Verbs: push.begin, push.commit, models, models.revoke, nodes, stats, rollout.start,
rollout.status, rollout.list, rollout.pause, rollout.resume, rollout.promote,
rollout.abort, rollout.rollback, samples, samples.image, samples.label (the chunk
upload on `upload` has its own route, hub/control.py and push.py; so do the nodes'
sample uploads, hub/samples.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.orchestrator import Orchestrator
from cellwatch.hub.push import Push
from cellwatch.hub.queries import Queries
from cellwatch.hub.registry import Registry
from cellwatch.hub.samplequeries import SampleQueries
from cellwatch.hub.samples import SampleStore
from cellwatch.hub.served import ServedTotals
from cellwatch.shared.base import first_problem
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.hubapi import (
    ModelsArgs,
    NoArgs,
    PushBeginArgs,
    PushCommitArgs,
    RevokeArgs,
    RolloutIdArgs,
    RolloutStartArgs,
    RolloutStatusArgs,
    SampleImageArgs,
    SampleLabelArgs,
    SamplesArgs,
)
from cellwatch.shared.schemas import ApiError, ApiReply, ApiRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verb:
    args: type[BaseModel]
    run: Callable[[Any, float], BaseModel]
    mutating: bool = False


def error_reply(request_id: str | None, code: ApiErrorCode, message: str) -> ApiReply:
    return ApiReply(request_id=request_id, ok=False, error=ApiError(code=code, message=message))


class Api:
    def __init__(
        self,
        db: Database,
        registry: Registry,
        fleet: Fleet,
        orchestrator: Orchestrator,
        served: ServedTotals,
        samples: SampleStore | None = None,
    ) -> None:
        self.db = db
        self.samples = samples
        self.sample_queries = SampleQueries(db, registry, samples) if samples else None
        self.started_at = datetime.now(UTC)
        self.queries = q = Queries(db, fleet, served, self.started_at)
        self.push = push = Push(registry)
        orch = orchestrator
        self.verbs: dict[str, Verb] = {
            "push.begin": Verb(PushBeginArgs, lambda a, now: push.begin(a)),
            "push.commit": Verb(PushCommitArgs, push.commit, mutating=True),
            "models": Verb(ModelsArgs, lambda a, now: q.models(a.name)),
            "models.revoke": Verb(RevokeArgs, orch.revoke, mutating=True),
            "nodes": Verb(NoArgs, lambda a, now: q.nodes(now)),
            "stats": Verb(NoArgs, lambda a, now: q.stats()),
            "rollout.start": Verb(RolloutStartArgs, orch.start, mutating=True),
            "rollout.status": Verb(RolloutStatusArgs, lambda a, now: orch.status(a.rollout_id)),
            "rollout.list": Verb(NoArgs, lambda a, now: orch.recent()),
            "rollout.pause": Verb(
                RolloutIdArgs, lambda a, now: orch.pause(a.rollout_id, now), mutating=True
            ),
            "rollout.resume": Verb(
                RolloutIdArgs, lambda a, now: orch.resume(a.rollout_id, now), mutating=True
            ),
            "rollout.promote": Verb(
                RolloutIdArgs, lambda a, now: orch.promote(a.rollout_id, now), mutating=True
            ),
            "rollout.abort": Verb(
                RolloutIdArgs, lambda a, now: orch.abort(a.rollout_id, now), mutating=True
            ),
            "rollout.rollback": Verb(
                RolloutIdArgs, lambda a, now: orch.rollback(a.rollout_id, now), mutating=True
            ),
            "samples": Verb(SamplesArgs, lambda a, now: self._samples().list(a)),
            "samples.image": Verb(SampleImageArgs, lambda a, now: self._samples().image(a)),
            "samples.label": Verb(
                SampleLabelArgs, lambda a, now: self._samples().label(a, now), mutating=True
            ),
        }

    def _samples(self) -> SampleQueries:
        if self.sample_queries is None:
            raise ApiFailure(ApiErrorCode.NOT_FOUND, "this hub keeps no field samples")
        return self.sample_queries

    def samples_store(self) -> SampleStore:
        if self.samples is None:
            raise ApiFailure(ApiErrorCode.NOT_FOUND, "this hub keeps no field samples")
        return self.samples

    def handle(self, verb: str, req: ApiRequest, now: float) -> ApiReply:
        """Answer one request; never raises for anything a caller can send."""
        spec = self.verbs.get(verb)
        if spec is None:
            return error_reply(
                req.request_id,
                ApiErrorCode.UNKNOWN_VERB,
                f"unknown verb {verb!r} (known: {', '.join(sorted(self.verbs))})",
            )
        if spec.mutating:
            stored = self.db.reply(req.request_id)
            if stored is not None:
                if stored[0] != verb:
                    return error_reply(
                        req.request_id,
                        ApiErrorCode.CONFLICT,
                        f"request_id already used for {stored[0]}",
                    )
                log.info("api: %s %s repeated: same reply", verb, req.request_id)
                return ApiReply.model_validate_json(stored[1])
        try:
            args = spec.args.model_validate(req.args)
        except ValidationError as exc:
            return error_reply(
                req.request_id, ApiErrorCode.BAD_REQUEST, f"{verb}: {first_problem(exc)}"
            )
        try:
            data = spec.run(args, now)
        except ApiFailure as exc:
            log.info("api: %s %s: %s: %s", verb, req.request_id, exc.code, exc.message)
            return error_reply(req.request_id, exc.code, exc.message)
        except Exception:  # the API boundary: log it, answer, keep serving
            log.exception("api: %s %s failed", verb, req.request_id)
            return error_reply(
                req.request_id, ApiErrorCode.INTERNAL, f"{verb} failed inside the hub"
            )
        reply = ApiReply(request_id=req.request_id, ok=True, data=data.model_dump(mode="json"))
        if spec.mutating:
            self.db.save_reply(req.request_id, verb, reply.model_dump_json(by_alias=True), now)
        return reply
