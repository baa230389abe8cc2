"""Runs the rollouts: creates them, feeds them reports, ticks and operator verbs,
persists every change in the database and writes the desired models they ask for.

Only the hub's control thread calls it. Active rollouts live in memory and in the
database; a restarted hub reloads them and writes again every desired model the
broker had not acknowledged (timers continue from the stored timestamps, on the
monotonic clock from then on: hub/rollout.py, "Timers"). Every
change is stored before anything else sees it: a rollout that could not be stored is
reloaded from the database (the change is undone, the caller sees the error), and
desired models are written only after the store.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum

from cellwatch.hub.db import Database, window_facts
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.fleet import Fleet
from cellwatch.hub.registry import Registry
from cellwatch.hub.rollout import Rollout
from cellwatch.hub.rolloutinfo import describe
from cellwatch.hub.targets import Desired, ShadowWrite
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.hubapi import (
    RevokeArgs,
    RevokeReply,
    RolloutInfo,
    RolloutList,
    RolloutPolicy,
    RolloutStartArgs,
)
from cellwatch.shared.promotion import ShadowSpecError
from cellwatch.shared.provenance import MODEL_FLAGS, ModelFlag
from cellwatch.shared.schemas import ModelRef, ShadowReport, UpdateReport
from cellwatch.shared.states import RolloutState, ShadowState
from cellwatch.shared.waves import WaveSpecError

log = logging.getLogger(__name__)

WriteDesired = Callable[[Desired], None]
WriteShadow = Callable[[ShadowWrite], None]


class ShadowOutcome(StrEnum):
    """What became of a node's shadow report (the refusals are counted by reason)."""

    TAKEN = "taken"
    DUPLICATE_WINDOW = "duplicate_window"
    """Its window was stored before: not counted again (its state is taken)."""
    UNKNOWN_ROLLOUT = "unknown_rollout"
    """No such rollout, or one without a shadow phase."""
    NOT_A_TARGET = "not_a_target"
    """The node is not a target of the rollout, or names another model."""
    PHASE_OVER = "phase_over"
    """Its window came after the phase ended (promoted, aborted): not counted, so the
    evidence is what the decision saw (its state is taken)."""


CONFIRM_FLAGS: tuple[ModelFlag, ...] = MODEL_FLAGS
"""Model flags that `rollout.start` refuses without `yes_untrained`: all of them
(synthetic, untrained, unverified-base, no-skill, degraded)."""
FINISHED_KEPT = 8
"""Finished rollouts kept in memory for their late reports."""


class Orchestrator:
    def __init__(
        self,
        db: Database,
        fleet: Fleet,
        registry: Registry,
        defaults: RolloutPolicy,
        write_desired: WriteDesired,
        publish_revocations: Callable[[float], None] = lambda now: None,
        clock: Callable[[], float] = time.monotonic,
        write_shadow: WriteShadow = lambda order: None,
    ) -> None:
        self.db = db
        self.fleet = fleet
        self.registry = registry
        self.defaults = defaults
        self.write_desired = write_desired
        self.write_shadow = write_shadow
        self.publish_revocations = publish_revocations
        self.clock = clock
        """The monotonic clock of the rollouts' timers (the `now` the callers pass is
        wall time: what is stored and shown)."""
        self.active: dict[str, Rollout] = {}
        self._finished: OrderedDict[str, Rollout] = OrderedDict()

    def load(self) -> None:
        """Reload the active rollouts from the database (hub start)."""
        self.active = {r.rollout_id: r for r in self.db.rollouts(active_only=True, limit=10_000)}

    def reassert(self, node_id: str) -> None:
        """A node (re)connected: write again the desired models its unfinished targets
        ask for (the broker may have lost a retained one). The same message as before:
        a node already at work on it carries on."""
        running = self.fleet.model_of(node_id)
        for r in list(self.active.values()):
            d = r.reassert(node_id, running)
            if d is not None:
                log.info(
                    "rollout %s: node %s is back: desired %s written again",
                    r.rollout_id,
                    node_id,
                    d.model,
                )
                self.write_desired(d)

    def rewrite_unconfirmed(self) -> None:
        """Write again the desired models the broker had not acknowledged (once connected)."""
        for r in self.active.values():
            again = r.unconfirmed()
            log.info(
                "rollout %s: resumed (%s, wave %d/%d); writing %d unacknowledged desired",
                r.rollout_id,
                r.state,
                r.wave + 1,
                len(r.plan),
                len(again),
            )
            for d in again:
                self.write_desired(d)
            for order in r.shadow_writes(time.time()):
                self.write_shadow(order)  # the same again: a node already at it goes on

    # -- operator verbs ----------------------------------------------------------------
    def _describe(self, r: Rollout, *, existing: bool = False) -> RolloutInfo:
        manifest = self.registry.stored_manifest(r.model.manifest_sha256)
        flags: list[str] = list(manifest.flags) if manifest is not None else []
        return describe(r, existing=existing, model_flags=flags)

    def start(self, args: RolloutStartArgs, now: float) -> RolloutInfo:
        m = self.registry.find_servable(args.name, args.version)
        model = m.ref
        manifest = self.registry.stored_manifest(m.manifest_sha256)
        risky = [f for f in (manifest.flags if manifest else []) if f in CONFIRM_FLAGS]
        if risky and not args.yes_untrained:
            raise ApiFailure(
                ApiErrorCode.UNTRAINED_MODEL,
                f"{m.name} {m.version} is {' and '.join(f.upper() for f in risky)} (see its "
                "MODEL_CARD.md): it is not a model for real images; confirm with "
                "--yes-untrained to roll it out anyway",
            )
        ids = self.fleet.resolve(args.target.strip())
        for r in self.active.values():
            overlap = sorted(set(ids) & {t.node_id for t in r.targets})
            if not overlap:
                continue
            if r.model == model and sorted(t.node_id for t in r.targets) == ids:
                log.info("rollout %s: the same rollout is already %s", r.rollout_id, r.state)
                return self._describe(r, existing=True)
            raise ApiFailure(
                ApiErrorCode.CONFLICT,
                f"{', '.join(overlap)} already in rollout {r.rollout_id} ({r.model}, {r.state}): "
                "abort or finish it first",
            )
        try:
            policy = args.policy(self.defaults)
            shadow = args.shadow_policy()
        except (WaveSpecError, ShadowSpecError) as exc:
            raise ApiFailure(ApiErrorCode.BAD_REQUEST, str(exc)) from exc
        rollout = Rollout.create(
            self.db.next_rollout_id(),
            model,
            args.target.strip(),
            ids,
            self.fleet.views(),
            policy,
            now,
            shadow,
        )
        log.info(
            "rollout %s: %s to %s (%d nodes, waves %s)",
            rollout.rollout_id,
            model,
            rollout.target,
            len(ids),
            list(rollout.plan),
        )
        desired = rollout.tick(self.fleet.views(), now, self.clock())
        self._apply(rollout, desired)  # stored first: a failed store leaves no trace
        return self._describe(rollout)

    def get(self, rollout_id: str) -> Rollout:
        rid = rollout_id if rollout_id.startswith("r") else f"r{rollout_id}"
        r = self._find(rid)
        if r is None:
            raise ApiFailure(ApiErrorCode.NOT_FOUND, f"no rollout {rollout_id!r}")
        return r

    def status(self, rollout_id: str | None) -> RolloutInfo:
        if rollout_id is not None:
            return self._describe(self.get(rollout_id))
        latest = self.db.rollouts(limit=1)
        if not latest:
            raise ApiFailure(ApiErrorCode.NOT_FOUND, "no rollout yet")
        return self._describe(self.active.get(latest[0].rollout_id, latest[0]))

    def recent(self, limit: int = 50) -> RolloutList:
        return RolloutList(
            rollouts=[
                self._describe(self.active.get(r.rollout_id, r))
                for r in self.db.rollouts(limit=limit)
            ]
        )

    def pause(self, rollout_id: str, now: float) -> RolloutInfo:
        r = self.get(rollout_id)
        r.pause(now)
        self._apply(r, [])
        return self._describe(r)

    def resume(self, rollout_id: str, now: float) -> RolloutInfo:
        r = self.get(rollout_id)
        r.resume(now)
        self._apply(r, r.tick(self.fleet.views(), now, self.clock()))
        return self._describe(r)

    def abort(self, rollout_id: str, now: float) -> RolloutInfo:
        r = self.get(rollout_id)
        r.abort(now)
        self._apply(r, [])
        return self._describe(r)

    def promote(self, rollout_id: str, now: float) -> RolloutInfo:
        """End the shadow phase by the operator's word and begin the waves."""
        r = self.get(rollout_id)
        r.promote(now)  # RolloutError: a conflict
        self._apply(r, r.tick(self.fleet.views(), now, self.clock()))
        return self._describe(r)

    def rollback(self, rollout_id: str, now: float) -> RolloutInfo:
        r = self.get(rollout_id)
        newer = [
            x
            for x in self.db.rollouts(limit=10_000)
            if x.created_at > r.created_at and x.rollout_id != r.rollout_id
        ]
        revoked = {m.manifest_sha256: m for m in self.db.revoked_models()}
        for t in r.rollback_targets():
            back = revoked.get(t.previous.manifest_sha256) if t.previous else None
            if back is not None:
                raise ApiFailure(
                    ApiErrorCode.REVOKED,
                    f"{t.node_id} would go back to {back.name} {back.version}, which was "
                    f"revoked ({back.revoke_reason}): start a rollout of a good model instead",
                )
            for other in newer:
                target = other.get(t.node_id)
                if target is not None and target.issued:
                    raise ApiFailure(
                        ApiErrorCode.CONFLICT,
                        f"{t.node_id} was since updated by rollout {other.rollout_id}: "
                        "roll that one back first",
                    )
        desired = r.rollback(self.fleet.views(), now, mono=self.clock())
        self._apply(r, desired)
        return self._describe(r)

    def revoke(self, args: RevokeArgs, now: float) -> RevokeReply:
        """Revoke a model (a signed revocation): store it, abort its active rollouts,
        move every node whose retained desired model names it back to the model it
        ran before (the rollouts that switched them roll back), tell the nodes."""
        m = self.registry.revoke(args.revocation, now)
        model = m.ref
        aborted = []
        for r in list(self.active.values()):
            if r.model == model and r.state in (RolloutState.RUNNING, RolloutState.PAUSED):
                r.abort(now, f"{model} was revoked: {m.revoke_reason}")
                self._apply(r, [])
                aborted.append(r.rollout_id)
        moved = self._move_off(model, now)
        self.publish_revocations(now)
        nodes = sorted(
            n for n, view in self.fleet.views().items() if view.model and view.model == model
        )
        return RevokeReply(
            model=self.registry.info(m), nodes=nodes, aborted=aborted, moved=sorted(moved)
        )

    def _move_off(self, model: ModelRef, now: float) -> list[str]:
        """Write a desired model of their previous one for the nodes whose last desired
        names `model` (the retained message would otherwise keep naming it: a node
        refuses it, but a node that lost its revocation list would not)."""
        by_rollout: dict[str, set[str]] = {}
        for node_id, (rid, sha) in self.db.last_desired().items():
            if sha == model.manifest_sha256:
                by_rollout.setdefault(rid, set()).add(node_id)
        avoid = {x.manifest_sha256 for x in self.db.revoked_models()}
        moved: list[str] = []
        for rid, node_ids in sorted(by_rollout.items()):
            r = self._find(rid)
            if r is None or r.model != model:
                continue
            desired = r.rollback(
                self.fleet.views(),
                now,
                only=node_ids,
                avoid=avoid,
                why=f": {model} was revoked",
                mono=self.clock(),
            )
            if desired:
                self._apply(r, desired)
                moved += [d.node_id for d in desired]
        left = sorted(set().union(*by_rollout.values()) - set(moved)) if by_rollout else []
        if left:
            log.warning(
                "revoke %s: no earlier good model to send %s back to: their desired model "
                "still names it (they refuse it and fall back on their own)",
                model,
                ", ".join(left),
            )
        return moved

    # -- inputs from the fleet -------------------------------------------------------------
    def on_report(self, node_id: str, report: UpdateReport, now: float) -> None:
        r = self._find(report.rollout_id)
        if r is None:
            log.debug("node %s: report for unknown rollout %s", node_id, report.rollout_id)
            return
        error = (report.error.code, report.error.message) if report.error else None
        changed = r.on_report(
            node_id,
            report.rollout_id,
            report.model.manifest_sha256,
            report.state,
            report.progress,
            error,
            now,
            self.clock(),
        )
        if changed:
            log.debug(
                "rollout %s: node %s %s %.0f%%",
                r.rollout_id,
                node_id,
                report.state,
                report.progress * 100,
            )
            self._apply(r, [])  # the service ticks once it has caught up with the fleet

    def on_shadow_report(self, node_id: str, report: ShadowReport, now: float) -> ShadowOutcome:
        """A node's shadow report: its window stored once, its state and evidence taken
        into the rollout. A target that still shadows after the phase ended is told to
        stop again."""
        r = self._find(report.rollout_id)
        if r is None or r.shadow is None:
            log.warning(
                "node %s: shadow report for rollout %s, which has no shadow phase: refused",
                node_id,
                report.rollout_id,
            )
            return ShadowOutcome.UNKNOWN_ROLLOUT
        if r.get(node_id) is None or report.model != r.model:
            log.warning(
                "rollout %s: shadow report from %s (%s), not one of its targets: refused",
                r.rollout_id,
                node_id,
                report.model,
            )
            return ShadowOutcome.NOT_A_TARGET
        outcome = ShadowOutcome.TAKEN
        facts = None
        if report.window is not None:
            if not r.in_shadow:
                outcome = ShadowOutcome.PHASE_OVER
            elif self.db.add_shadow_window(r.rollout_id, node_id, report.window, now):
                facts = window_facts(report.window, now)
            else:
                outcome = ShadowOutcome.DUPLICATE_WINDOW
        error = (report.error.code, report.error.message) if report.error else None
        r.on_shadow(node_id, report.state, error, facts, now)
        self._apply(r, [])  # the service ticks once it has caught up
        stop = r.shadow_stop(node_id, now) if report.state is ShadowState.SHADOWING else None
        if stop is not None:
            log.info("rollout %s: node %s still shadows: told to stop again", r.rollout_id, node_id)
            self.write_shadow(stop)
        return outcome

    def on_confirmed(self, d: Desired) -> None:
        r = self.active.get(d.rollout_id)
        if r is not None and r.confirm(d.node_id, d.model.manifest_sha256):
            self._apply(r, [])

    def tick(self, now: float) -> None:
        if not self.active:
            return
        views = self.fleet.views()
        mono = self.clock()
        for r in list(self.active.values()):
            desired = r.tick(views, now, mono)
            if desired or r.events:
                self._apply(r, desired)

    def _find(self, rollout_id: str) -> Rollout | None:
        """An active rollout, else one of the latest finished ones (late reports of a
        2,000-node rollout must not load it 2,000 times), else the database's."""
        r = self.active.get(rollout_id) or self._finished.pop(rollout_id, None)
        if r is None:
            r = self.db.rollout(rollout_id)
        if r is not None and not r.active:
            self._keep_finished(r)
        return r

    def _keep_finished(self, r: Rollout) -> None:
        self._finished[r.rollout_id] = r  # the most recent last
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

    def _apply(self, r: Rollout, desired: list[Desired]) -> None:
        """Store r (then log its events, write its desired models, track it while it is
        active). If the store fails, r is reloaded as stored and the error raised."""
        try:
            self.db.save_rollout(r, r.events, time.time())
        except Exception:
            self._finished.pop(r.rollout_id, None)
            stored = self.db.rollout(r.rollout_id)
            if stored is not None and stored.active:
                self.active[r.rollout_id] = stored
            else:
                self.active.pop(r.rollout_id, None)
            raise
        for event in r.events:
            log.info("rollout %s: %s", r.rollout_id, event)
        r.events.clear()
        if r.active:
            self.active[r.rollout_id] = r
            self._finished.pop(r.rollout_id, None)
        else:
            self.active.pop(r.rollout_id, None)
            self._keep_finished(r)
        for d in desired:
            self.write_desired(d)
        for order in r.shadow_writes(time.time()):
            self.write_shadow(order)
