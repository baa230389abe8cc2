"""The rollout state machine (DESIGN.md, Rollout): pure logic, no I/O.

A `Rollout` moves its targets (sorted node ids) through waves. Time is passed in
(`now`, seconds since the epoch, for what is stored and shown; `mono`, a monotonic
clock, for the timers) and the fleet is passed in as `NodeView`s, so every rule is
unit-testable; the orchestrator persists the result and writes the `Desired`
models the methods return (those records and `Target`: hub/targets.py).

Timers: a target's deadline is monotonic (`Target.deadline`), so a step of the wall
clock (NTP, an operator) times nothing out. What is stored is when its clock
started (`clock_from`, wall time): the durable deadline is clock_from +
node_timeout_s, turned back into a monotonic one the first time a rollout loaded
from the database is ticked (the time left, at most node_timeout_s: a wall clock
stepped back while the hub was down gives no target more than a full timeout).

Rules:
- `tick` issues the first wave, then the next one as soon as the current wave's
  share of `active` nodes reaches `advance_at`; it completes the rollout once the
  last wave has finished. A wave that finished below `advance_at` aborts it.
- A node already running the target counts as `active` when its wave is issued.
- Abort rule: once at least `min_executed` targets finished (active, failed or
  timed_out), more than `max_failures` failures (count, or % of the targets) abort.
- A node not `active` within `node_timeout_s` is `timed_out`. The clock starts when
  its desired is written, or when the node is next seen online if it was offline
  then (offline nodes converge when they return; they do not fail meanwhile). A
  late `active` still counts. A node whose site's link goes down (DESIGN.md, Sites)
  has its clock stopped, and started again in full when it is back online: a
  rollout that includes the site waits for it.
- pause: no new waves (nodes already told go on). resume. abort: no new waves; nodes
  already switched stay. rollback: every node that was told to switch and ran
  another model at the start is told to go back to it (same rollout id); a node
  that ran nothing (or already the target) is left alone.
- Shadow phase (`shadow`, hub/shadowing.py): a rollout started with one is
  `shadowing`: every target is told to load the candidate beside its serving model
  (`ShadowWrite`) and no wave is issued. Each tick judges the evidence: the rule
  promotes (the waves begin at once) or aborts; more failed targets than
  `max_failures` abort it; `shadow_for_s` pauses it for the operator. pause keeps the
  nodes scoring; resume goes on shadowing for another `shadow_for_s`; promote (the
  operator's) begins the waves. Whenever the phase ends (promoted, aborted, rolled
  back) every target is told to stop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from cellwatch.hub.errors import RolloutError
from cellwatch.hub.shadowing import ShadowPhase, WindowFacts, describe_agreement
from cellwatch.hub.targets import Desired, NodeView, ShadowWrite, Target
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.hubapi import RolloutPolicy, ShadowPolicy
from cellwatch.shared.promotion import duration_text
from cellwatch.shared.schemas import ModelRef
from cellwatch.shared.states import (
    ACTIVE_ROLLOUT_STATES,
    TARGET_FAILURES,
    UPDATE_IN_PROGRESS,
    RolloutState,
    ShadowState,
    TargetPhase,
    UpdateState,
)
from cellwatch.shared.waves import parse_threshold, parse_waves, plan_waves, wave_of

EVENT_NODES = 20
"""A wave's event names at most this many of its nodes (then "and N more")."""


@dataclass
class Rollout:
    rollout_id: str
    model: ModelRef
    target: str
    policy: RolloutPolicy
    plan: tuple[int, ...]
    """Cumulative targets per wave: the policy's waves for these targets (plan_waves)."""
    targets: list[Target]
    created_at: float
    state: RolloutState = RolloutState.RUNNING
    wave: int = -1
    reason: str | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    shadow: ShadowPhase | None = None
    """Its shadow phase, if it began with one (open, or how it ended)."""
    events: list[str] = field(default_factory=list, repr=False, compare=False)
    """Log lines produced by the last calls (the orchestrator logs and clears them)."""
    _index: dict[str, Target] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {t.node_id: t for t in self.targets}

    # -- construction ----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        rollout_id: str,
        model: ModelRef,
        target: str,
        node_ids: list[str],
        fleet: Mapping[str, NodeView],
        policy: RolloutPolicy,
        now: float,
        shadow: ShadowPolicy | None = None,
    ) -> Rollout:
        ids = sorted(set(node_ids))
        if not ids:
            raise RolloutError("the rollout has no target nodes")
        plan = tuple(plan_waves(len(ids), parse_waves(policy.waves)))
        targets = []
        for position, node_id in enumerate(ids):
            view = fleet.get(node_id)
            targets.append(
                Target(
                    node_id=node_id,
                    wave=wave_of(position, list(plan)),
                    previous=view.model if view is not None else None,
                    updated_at=now,
                )
            )
        r = cls(rollout_id, model, target, policy, plan, targets, now, updated_at=now)
        if shadow is not None:
            r.shadow = ShadowPhase(shadow, started_at=now)
            r.state = RolloutState.SHADOWING
            r._event(
                f"shadow phase: {shadow.rate:.0%} of live images on {len(ids)} nodes"
                + (f", promote when {shadow.promote_when}" if shadow.promote_when else "")
                + (
                    f", for up to {duration_text(shadow.shadow_for_s)}"
                    if shadow.shadow_for_s
                    else ""
                )
            )
        return r

    # -- queries -----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state in ACTIVE_ROLLOUT_STATES

    def get(self, node_id: str) -> Target | None:
        return self._index.get(node_id)

    @property
    def in_shadow(self) -> bool:
        """Its shadow phase goes on (shadowing, or paused in it)."""
        return self.shadow is not None and self.shadow.open

    def shadow_writes(self, now: float) -> list[ShadowWrite]:
        """The shadow orders to write for every target (or the stops, once the phase
        ended), once per hub process; [] when written already or without a phase."""
        s = self.shadow
        if s is None or s.announced:
            return []
        s.announced = True
        model = self.model if s.open else None
        return [
            ShadowWrite(t.node_id, self.rollout_id, model, s.policy.rate if s.open else 0.0, now)
            for t in self.targets
        ]

    def shadow_stop(self, node_id: str, now: float) -> ShadowWrite | None:
        """The stop to write again for a target that still reports shadowing after its
        phase ended (its retained order was lost or is stale)."""
        if self.shadow is None or self.shadow.open or self.get(node_id) is None:
            return None
        return ShadowWrite(node_id, self.rollout_id, None, 0.0, now)

    def wave_targets(self, index: int) -> list[Target]:
        return [t for t in self.targets if t.wave == index]

    def expected(self, t: Target) -> ModelRef | None:
        """The model the target's current phase asks for."""
        return self.model if t.phase is TargetPhase.ROLLOUT else t.previous

    def counts(self) -> Counter[UpdateState]:
        return Counter(t.state for t in self.targets)

    def failures(self) -> int:
        return sum(
            1 for t in self.targets if t.phase is TargetPhase.ROLLOUT and t.state in TARGET_FAILURES
        )

    def executed(self) -> int:
        return sum(1 for t in self.targets if t.phase is TargetPhase.ROLLOUT and t.finished)

    def unconfirmed(self) -> list[Desired]:
        """Desired models issued but not acknowledged by the broker (write them again)."""
        out = []
        for t in self.targets:
            model = self.expected(t)
            if t.issued and not t.confirmed and model is not None and not self._stale_phase(t):
                out.append(self._desired(t, model))
        return out

    def reassert(self, node_id: str, running: ModelRef | None) -> Desired | None:
        """The desired model to write again for node_id: its target is issued and
        unfinished in the current phase and the node does not run the model yet."""
        t = self.get(node_id)
        if t is None or not t.issued or t.finished or self._stale_phase(t):
            return None
        model = self.expected(t)
        if model is None or model == running:
            return None
        return self._desired(t, model)

    def _desired(self, t: Target, model: ModelRef) -> Desired:
        assert t.issued_at is not None
        return Desired(t.node_id, self.rollout_id, model, t.issued_at)

    def _stale_phase(self, t: Target) -> bool:
        return self.state in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK) and (
            t.phase is TargetPhase.ROLLOUT
        )

    # -- inputs ----------------------------------------------------------------------
    def on_report(
        self,
        node_id: str,
        rollout_id: str,
        sha256: str,
        state: UpdateState,
        progress: float,
        error: tuple[UpdateErrorCode, str] | None,
        now: float,
        mono: float | None = None,
    ) -> bool:
        """Apply a node's UpdateReport; False if it is not about this rollout's work.
        mono: the monotonic clock (default now)."""
        t = self.get(node_id)
        if t is None or rollout_id != self.rollout_id or not t.issued:
            return False
        expected = self.expected(t)
        if expected is None or sha256 != expected.manifest_sha256:
            return False
        if t.clock_from is None:
            self._start_clock(t, now, now if mono is None else mono)
        if state is UpdateState.ACTIVE:
            if t.state in (UpdateState.ACTIVE, UpdateState.ROLLED_BACK):
                return False
            self._succeed(t, now)
        elif state is UpdateState.FAILED:
            if t.finished and t.state is not UpdateState.FAILED:
                return False
            t.state = UpdateState.FAILED
            t.error_code, t.error_message = error or (UpdateErrorCode.INTERNAL, "no error given")
            t.finished_at = now
            self._event(f"node {node_id} failed ({t.error_code}): {t.error_message}")
        elif state in UPDATE_IN_PROGRESS:
            if t.finished:
                return False  # e.g. a node retrying after a restart: keep the outcome
            t.state = state
            t.progress = progress
        else:
            return False
        t.updated_at = now
        self.updated_at = now
        return True

    def confirm(self, node_id: str, sha256: str) -> bool:
        """The broker acknowledged the desired written for node_id (model sha256)."""
        t = self.get(node_id)
        expected = self.expected(t) if t is not None else None
        if t is None or expected is None or expected.manifest_sha256 != sha256 or t.confirmed:
            return False
        t.confirmed = True
        return True

    def on_shadow(
        self,
        node_id: str,
        state: ShadowState,
        error: tuple[UpdateErrorCode, str] | None,
        window: WindowFacts | None,
        now: float,
    ) -> bool:
        """Apply a target's shadow report (its window stored once by the caller); False
        if the node is no target or the rollout had no shadow phase."""
        t = self.get(node_id)
        s = self.shadow
        if t is None or s is None:
            return False
        if window is not None:
            s.add(node_id, window)
        code, message = error if error is not None else (None, None)
        if state is ShadowState.FAILED and code is None:
            code, message = UpdateErrorCode.INTERNAL, "no error given"
        if (t.shadow_state, t.shadow_error_code, t.shadow_error_message) != (state, code, message):
            if state is ShadowState.FAILED and s.open:
                self._event(f"node {node_id} cannot shadow the candidate ({code}): {message}")
            t.shadow_state, t.shadow_error_code, t.shadow_error_message = state, code, message
            t.updated_at = now
        self.updated_at = now
        return True

    def tick(
        self, fleet: Mapping[str, NodeView], now: float, mono: float | None = None
    ) -> list[Desired]:
        """Apply timeouts and the abort/advance rules; returns the desired to write.
        mono: the monotonic clock of the timers (default now)."""
        if not self.active:
            return []
        mono = now if mono is None else mono
        self._watch_nodes(fleet, now, mono)
        if self.state is RolloutState.ROLLING_BACK:
            back = [t for t in self.targets if t.phase is TargetPhase.ROLLBACK]
            if all(t.finished for t in back):
                done = sum(1 for t in back if t.state is UpdateState.ROLLED_BACK)
                self._finish(
                    RolloutState.ROLLED_BACK, f"{done} of {len(back)} nodes rolled back", now
                )
            return []
        if self.state is RolloutState.SHADOWING:
            self._judge_shadow(now, mono)
        if self.state is not RolloutState.RUNNING and self.in_shadow:
            return []
        if self._abort_rule(now):
            return []
        out: list[Desired] = []
        while self.state is RolloutState.RUNNING:
            if self.wave < 0:
                out += self._issue(0, fleet, now, mono)
                continue
            current = self.wave_targets(self.wave)
            active = sum(1 for t in current if t.state is UpdateState.ACTIVE)
            if active >= self.policy.advance_at * len(current) - 1e-9:
                if self.wave + 1 < len(self.plan):
                    out += self._issue(self.wave + 1, fleet, now, mono)
                    continue
                if all(t.finished for t in self.targets):
                    self._finish(RolloutState.COMPLETED, self._summary(), now)
            elif all(t.finished for t in current):
                self._finish(
                    RolloutState.ABORTED,
                    f"wave {self.wave + 1} finished with {active} of {len(current)} nodes "
                    f"active, below advance_at {self.policy.advance_at:.0%}",
                    now,
                )
            break
        return out

    # -- operator verbs ------------------------------------------------------------
    def pause(self, now: float) -> None:
        if self.state is RolloutState.PAUSED:
            return
        if self.state not in (RolloutState.RUNNING, RolloutState.SHADOWING):
            raise RolloutError(f"rollout {self.rollout_id} is {self.state}: cannot pause it")
        why = "paused by the operator" + (
            " (the nodes go on scoring the candidate)" if self.in_shadow else ""
        )
        self._set(RolloutState.PAUSED, now, why)

    def resume(self, now: float) -> None:
        if self.state in (RolloutState.RUNNING, RolloutState.SHADOWING):
            return
        if self.state is not RolloutState.PAUSED:
            raise RolloutError(f"rollout {self.rollout_id} is {self.state}: cannot resume it")
        if self.shadow is not None and self.shadow.open:
            # Another shadow_for_s of shadowing: the period counts from now.
            self.shadow.started_at, self.shadow.deadline = now, None
            self._set(RolloutState.SHADOWING, now, None)
            return
        self._set(RolloutState.RUNNING, now, None)

    def promote(self, now: float, why: str = "promoted by the operator") -> None:
        """End the shadow phase and begin the waves (the next tick issues wave 1)."""
        s = self.shadow
        if s is None or not s.open:
            what = "had no shadow phase" if s is None else "is past its shadow phase"
            raise RolloutError(f"rollout {self.rollout_id} {what}: nothing to promote")
        if self.state not in (RolloutState.SHADOWING, RolloutState.PAUSED):
            raise RolloutError(f"rollout {self.rollout_id} is {self.state}: cannot promote it")
        figures = describe_agreement(s.totals().agreement)
        s.end(now, f"{why} ({figures})")
        self._set(RolloutState.RUNNING, now, s.outcome)

    def abort(self, now: float, reason: str = "aborted by the operator") -> None:
        if self.state is RolloutState.ABORTED:
            return
        if self.state not in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.SHADOWING):
            raise RolloutError(
                f"rollout {self.rollout_id} is {self.state}: cannot abort it"
                + (" (use rollback)" if self.state is RolloutState.COMPLETED else "")
            )
        self._finish(RolloutState.ABORTED, reason, now)

    def rollback(
        self,
        fleet: Mapping[str, NodeView],
        now: float,
        *,
        only: Collection[str] | None = None,
        avoid: Collection[str] = (),
        why: str = "",
        mono: float | None = None,
    ) -> list[Desired]:
        """Send every switched (or switching) node back to its previous model. With
        `only` (a revocation moving nodes off this rollout's model), just those of
        them still on this rollout's model, and none whose previous model's sha256 is
        in `avoid`; nothing changes if that leaves none."""
        if only is None:
            if self.state is RolloutState.ROLLING_BACK:
                return []
            if self.state is RolloutState.ROLLED_BACK:
                raise RolloutError(f"rollout {self.rollout_id} is already rolled back")
        out = []
        for t in self.rollback_targets():
            assert t.previous is not None
            if only is not None and (t.node_id not in only or t.phase is not TargetPhase.ROLLOUT):
                continue
            if t.previous.manifest_sha256 in avoid:
                continue
            view = fleet.get(t.node_id)
            t.phase, t.state, t.progress = TargetPhase.ROLLBACK, UpdateState.PENDING, 0.0
            t.error_code = t.error_message = None
            t.issued_at, t.finished_at, t.updated_at, t.confirmed = now, None, now, False
            online = view is not None and view.online
            self._start_clock(t, now, now if mono is None else mono, online)
            out.append(self._desired(t, t.previous))
        if only is not None and not out:
            return []
        if self.shadow is not None:
            self.shadow.end(now, "rolled back during the shadow phase")
        self.state, self.finished_at, self.updated_at = RolloutState.ROLLING_BACK, None, now
        self.reason = f"rolling back {len(out)} nodes{why}"
        self._event(self.reason)
        if not out:
            self._finish(
                RolloutState.ROLLED_BACK, "no node had switched: nothing to roll back", now
            )
        return out

    def rollback_targets(self) -> list[Target]:
        """The targets a rollback sends back: told to switch, with another previous model."""
        return [
            t
            for t in self.targets
            if t.issued
            and t.previous is not None
            and t.previous.manifest_sha256 != self.model.manifest_sha256
        ]

    # -- internals ---------------------------------------------------------------------
    def _issue(
        self, index: int, fleet: Mapping[str, NodeView], now: float, mono: float
    ) -> list[Desired]:
        self.wave = index
        out = []
        for t in self.wave_targets(index):
            view = fleet.get(t.node_id)
            t.issued_at, t.updated_at, t.confirmed = now, now, False
            self._start_clock(t, now, mono, view is not None and view.online)
            t.state = UpdateState.PENDING
            if view is not None and view.model is not None and view.model == self.model:
                self._succeed(t, now)
            out.append(self._desired(t, self.model))
        self.updated_at = now
        ids = [t.node_id for t in self.wave_targets(index)]
        more = f" and {len(ids) - EVENT_NODES} more" if len(ids) > EVENT_NODES else ""
        self._event(
            f"wave {index + 1}/{len(self.plan)} issued: " + ", ".join(ids[:EVENT_NODES]) + more
        )
        return out

    def _start_clock(self, t: Target, now: float, mono: float, online: bool = True) -> None:
        """Start t's timeout clock now, or (its node offline) when it is next online."""
        t.clock_from = now if online else None
        t.deadline = mono + self.policy.node_timeout_s if online else None

    def _deadline(self, t: Target, now: float, mono: float) -> float | None:
        """t's monotonic deadline; for a target loaded from the database, the stored
        one (clock_from + node_timeout_s, wall time) turned into a monotonic one."""
        if t.deadline is None and t.clock_from is not None:
            timeout = self.policy.node_timeout_s
            left = min(max(t.clock_from + timeout - now, 0.0), timeout)
            t.deadline = mono + left
        return t.deadline

    def _watch_nodes(self, fleet: Mapping[str, NodeView], now: float, mono: float) -> None:
        for t in self.targets:
            if not t.issued or t.finished or self._stale_phase(t):
                continue
            view = fleet.get(t.node_id)
            expected = self.expected(t)
            if (
                view is not None
                and view.model == expected
                and t.issued_at is not None
                and view.model_at > t.issued_at
            ):
                self._succeed(t, now)  # its status says so (the report may be lost)
                continue
            if t.clock_from is not None and view is not None and not view.reachable:
                t.clock_from = t.deadline = None
                self._event(f"node {t.node_id}: its site is unreachable: its clock stops")
            if t.clock_from is None and view is not None and view.online:
                self._start_clock(t, now, mono)
                self._event(
                    f"node {t.node_id} is online: its {self.policy.node_timeout_s:g} s start"
                )
            deadline = self._deadline(t, now, mono)
            if deadline is not None and mono > deadline:
                t.state, t.finished_at, t.updated_at = UpdateState.TIMED_OUT, now, now
                t.error_code = UpdateErrorCode.TIMED_OUT
                t.error_message = f"not active within {self.policy.node_timeout_s:g} s"
                self._event(f"node {t.node_id} timed out ({t.phase})")

    def _succeed(self, t: Target, now: float) -> None:
        t.state = UpdateState.ACTIVE if t.phase is TargetPhase.ROLLOUT else UpdateState.ROLLED_BACK
        t.progress, t.finished_at, t.updated_at = 1.0, now, now
        t.error_code = t.error_message = None
        self._event(f"node {t.node_id} {t.state} ({self.expected(t)})")

    def _judge_shadow(self, now: float, mono: float) -> None:
        """The shadow phase's rules (see the module docstring)."""
        s = self.shadow
        assert s is not None
        failed = [t for t in self.targets if t.shadow_state is ShadowState.FAILED]
        limit = parse_threshold(self.policy.max_failures).of(len(self.targets))
        if len(failed) > limit + 1e-9:
            first = failed[0]
            self._finish(
                RolloutState.ABORTED,
                f"shadow phase failed: {len(failed)} of {len(self.targets)} nodes could not load "
                f"the candidate beside their model, over max_failures {self.policy.max_failures} "
                f"({first.node_id}: {first.shadow_error_code}: {first.shadow_error_message})",
                now,
            )
            return
        verdict = s.verdict()
        if verdict.action == "promote":
            s.end(now, f"promoted by its rule {s.policy.promote_when}: {verdict.text}")
            self._set(RolloutState.RUNNING, now, s.outcome)
            return
        if verdict.action == "abort":
            self._finish(RolloutState.ABORTED, verdict.text, now)
            return
        length = s.policy.shadow_for_s
        if length is None:
            return
        if s.deadline is None:
            left = min(max(s.started_at + length - now, 0.0), length)
            s.deadline = mono + left
        if mono >= s.deadline:
            self._set(
                RolloutState.PAUSED,
                now,
                f"shadow phase over after {duration_text(length)} without promotion "
                f"({verdict.text}): `rollout promote {self.rollout_id}` to go on, "
                f"`rollout abort {self.rollout_id}` to stop",
            )

    def _abort_rule(self, now: float) -> bool:
        if self.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
            return False
        executed, failures = self.executed(), self.failures()
        limit = parse_threshold(self.policy.max_failures).of(len(self.targets))
        if executed >= self.policy.min_executed and failures > limit + 1e-9:
            self._finish(
                RolloutState.ABORTED,
                f"{failures} failed of {executed} finished, over max_failures "
                f"{self.policy.max_failures}",
                now,
            )
            return True
        return False

    def _summary(self) -> str:
        c = self.counts()
        failed = sum(c[s] for s in TARGET_FAILURES)
        return f"{c[UpdateState.ACTIVE]} of {len(self.targets)} nodes active" + (
            f", {failed} failed" if failed else ""
        )

    def _set(self, state: RolloutState, now: float, reason: str | None) -> None:
        self.state, self.updated_at, self.reason = state, now, reason
        self._event(f"{state}" + (f": {reason}" if reason else ""))

    def _finish(self, state: RolloutState, reason: str, now: float) -> None:
        if self.shadow is not None:
            self.shadow.end(now, f"{state}: {reason}")
        self.state, self.reason = state, reason
        self.finished_at = self.updated_at = now
        self._event(f"{state}: {reason}")

    def _event(self, text: str) -> None:
        self.events.append(text)
