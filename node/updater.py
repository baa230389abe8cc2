"""The node's update agent: reconciles the retained `desired` model (DESIGN.md, Rollout)
and the hub's revocation list.

On a new DesiredModel it reports each state in an UpdateReport: `pending`, then
`downloading` (manifest and signature first, the signature checked before any
large file is fetched; then the files in resumable chunks), `verifying` (every
hash and the signature again, on the complete bundle), `activating` (compile on
this node's device and run the golden self-test), `active` once the service
serves it. A bundle already in the store (the last few activated ones) is
activated without a download, which is what makes a rollback fast; it is verified
on use, and one that fails (a damaged file, a signature no longer trusted) is
discarded and fetched again (node/acquire.py obtains a verified bundle). Any failure
reports `failed` with a code and leaves the old model serving; the agent survives
anything (an unexpected exception is reported as `internal`, and the next desired
model is handled as usual).

Revocations (`{prefix}/hub/revoked`, retained, written by the hub only): only those
signed by a trusted release key are taken, and none is ever dropped (a list that
leaves one out is refused and logged: shared/revocations.py); a revoked
bundle is never activated (`failed`, code `revoked`); when the bundle being served
is revoked, the node moves to the newest earlier bundle in its store that loads and
is not revoked, or, if none does, answers `no_model`; its status says why
(`model_error`, code `revoked`).

Shadow orders (`{prefix}/nodes/{node_id}/shadow`, retained, from the hub): the same
thread fetches and verifies the candidate as any bundle (reported as `loading` on the
shadow report topic), checks it can be scored beside the serving model, compiles it
for the shadow scorer and hands it over (node/shadow.py); a stop order unloads it. A
failure reports `failed` with a code and leaves the serving model as it was.

Work runs on the agent's own thread; the edge's routes (`routes()`: desired model,
shadow order and revocation list, validated and capped there) only hand messages
over. Reports go out through a Publisher, so the agent runs without a broker too.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cellwatch.node.acquire import BundleSource, UpdateFailed
from cellwatch.node.engine import EngineConfig, ServingModel
from cellwatch.node.faults import NO_FAULTS, Faults
from cellwatch.node.fetcher import FetchCancelled, Fetcher
from cellwatch.node.loader import BundleLoader, Candidate, LoadFailure
from cellwatch.node.shadow import ShadowRefused, ShadowScorer, check_beside
from cellwatch.node.store import BundleStore
from cellwatch.shared.codes import ModelErrorCode, UpdateErrorCode, as_update_error
from cellwatch.shared.limits import MAX_NODE_MESSAGE_BYTES, MAX_REVOCATION_BYTES
from cellwatch.shared.revocations import merge as merge_revocations
from cellwatch.shared.rpc import Inbound, Publisher, Rejected, Route
from cellwatch.shared.schemas import (
    DesiredModel,
    ModelError,
    RevocationList,
    ShadowOrder,
    UpdateError,
    UpdateReport,
    utcnow,
)
from cellwatch.shared.states import ShadowState, UpdateState
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

Activate = Callable[[ServingModel, ModelError | None], None]
"""Serve this model from now on; the error (or None) is what the status says of it."""
Deactivate = Callable[[ModelError], None]
"""Serve nothing (answer no_model) from now on, for this reason."""


@dataclass(frozen=True)
class ShadowSetup:
    """What the agent needs for shadow orders (None: the node does not shadow)."""

    scorer: ShadowScorer
    engine: EngineConfig
    """The candidate's (node/shadow.py: shadow_engine)."""
    min_free_mb: int
    serving: Callable[[], ServingModel | None]


class UpdateAgent:
    def __init__(
        self,
        *,
        publisher: Publisher,
        topics: Topics,
        node_id: str,
        store: BundleStore,
        fetcher: Fetcher,
        loader: BundleLoader,
        current_sha: Callable[[], str | None],
        activate: Activate,
        deactivate: Deactivate,
        faults: Faults = NO_FAULTS,
        shadow: ShadowSetup | None = None,
    ) -> None:
        self.publisher = publisher
        self.topics = topics
        self.node_id = node_id
        self.store = store
        self.fetcher = fetcher
        self.loader = loader
        self.faults = faults
        self.source = BundleSource(node_id, store, fetcher, loader, faults)
        self._current_sha = current_sha
        self._activate = activate
        self._deactivate = deactivate
        self._cond = threading.Condition()
        self._desired: DesiredModel | None = None
        self._in_progress: DesiredModel | None = None
        self._generation = 0
        self._revocations: RevocationList | None = None
        """A revocation list received and not yet applied."""
        self.shadow = shadow
        self._shadow_order: ShadowOrder | None = None
        self._shadow_generation = 0
        stored = store.revoked()
        self._revoked: frozenset[str] = stored.shas() if stored is not None else frozenset()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"{node_id}-updater", daemon=True)
        self.last_report: UpdateReport | None = None

    @property
    def revoked(self) -> frozenset[str]:
        """Manifest sha256 of every bundle the hub revoked (as last heard)."""
        return self._revoked

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        self.fetcher.close()

    # -- routes (network thread) -------------------------------------------------------
    def routes(self) -> list[Route[Any]]:
        """The retained desired model and revocation list (an empty one clears it)."""

        def retained(topic: str, body: Any, handler: Any, cap: int, name: str) -> Route[Any]:
            return Route(
                topic,
                body,
                handler,
                max_bytes=cap,
                on_rejected=self._malformed,
                empty_clears=True,
                name=name,
            )

        return [
            retained(
                self.topics.desired(self.node_id),
                DesiredModel.model_validate_json,
                self.on_desired,
                MAX_NODE_MESSAGE_BYTES,
                "desired model",
            ),
            *(
                [
                    retained(
                        self.topics.shadow(self.node_id),
                        ShadowOrder.model_validate_json,
                        self.on_shadow,
                        MAX_NODE_MESSAGE_BYTES,
                        "shadow order",
                    )
                ]
                if self.shadow is not None
                else []
            ),
            retained(
                self.topics.hub_revoked(),
                RevocationList.model_validate_json,
                self.on_revoked,
                MAX_REVOCATION_BYTES,
                "revocation list",
            ),
        ]

    def _malformed(self, rejected: Rejected) -> None:
        log.error(
            "node %s: ignoring a malformed %s: %s", self.node_id, rejected.topic, rejected.reason
        )

    def on_desired(self, inbound: Inbound[DesiredModel]) -> None:
        desired = inbound.body
        with self._cond:
            if desired == self._in_progress:
                # The broker resent the retained desired on reconnect, or the hub said it
                # again (same issue, same message): keep going.
                return
            self._desired = desired
            self._generation += 1
            self._cond.notify_all()

    def on_shadow(self, inbound: Inbound[ShadowOrder]) -> None:
        with self._cond:
            self._shadow_order = inbound.body
            self._shadow_generation += 1
            self._cond.notify_all()

    def on_revoked(self, inbound: Inbound[RevocationList]) -> None:
        with self._cond:
            self._revocations = inbound.body
            self._cond.notify_all()

    # -- agent thread ------------------------------------------------------------------
    def _work_waiting(self, seen: int, shadow_seen: int) -> bool:
        return (
            self._stop
            or self._generation != seen
            or self._shadow_generation != shadow_seen
            or self._revocations is not None
        )

    def _run(self) -> None:
        seen = shadow_seen = 0
        while True:
            with self._cond:
                while not self._work_waiting(seen, shadow_seen):
                    self._cond.wait()
                if self._stop:
                    return
                revocations, self._revocations = self._revocations, None
                desired = order = None
                if self._generation != seen:
                    seen = self._generation
                    desired = self._in_progress = self._desired
                if self._shadow_generation != shadow_seen:
                    shadow_seen = self._shadow_generation
                    order = self._shadow_order
            try:
                if revocations is not None:
                    self._apply_revocations(revocations)
                if desired is not None:
                    self._reconcile(desired, seen)
                if order is not None:
                    self._reconcile_shadow(order, shadow_seen)
            except Exception as exc:  # the agent outlives anything one update does
                log.exception("node %s: update step failed", self.node_id)
                if desired is not None:
                    self._failed(desired, UpdateErrorCode.INTERNAL, f"internal error: {exc}")
                if order is not None and order.model is not None and self.shadow is not None:
                    self.shadow.scorer.failed(
                        order.rollout_id,
                        order.model,
                        UpdateErrorCode.INTERNAL,
                        f"internal error: {exc}",
                    )
            finally:
                with self._cond:
                    self._in_progress = None

    def _superseded(self, generation: int) -> bool:
        with self._cond:
            return self._stop or self._generation != generation

    def _shadow_superseded(self, generation: int) -> bool:
        with self._cond:
            return self._stop or self._shadow_generation != generation

    def _report(
        self, d: DesiredModel, state: UpdateState, progress: float, error: UpdateError | None = None
    ) -> None:
        report = UpdateReport(
            rollout_id=d.rollout_id,
            model=d.model,
            state=state,
            progress=round(min(max(progress, 0.0), 1.0), 4),
            error=error,
            ts=utcnow(),
        )
        self.last_report = report
        self.publisher.publish(self.topics.update(self.node_id), report.to_json(), qos=1)

    def _failed(self, d: DesiredModel, code: UpdateErrorCode, message: str) -> None:
        log.error(
            "node %s: rollout %s: update failed (%s): %s", self.node_id, d.rollout_id, code, message
        )
        try:
            self._report(d, UpdateState.FAILED, 0.0, UpdateError(code=code, message=message[:2048]))
        except Exception:  # e.g. the connection: the hub times the node out instead
            log.exception("node %s: cannot report the failure", self.node_id)

    def _reconcile(self, d: DesiredModel, generation: int) -> None:
        sha = d.model.manifest_sha256
        rid = d.rollout_id
        if sha in self._revoked:
            self._failed(d, UpdateErrorCode.REVOKED, f"{d.model.name} {d.model.version} is revoked")
            return
        if self._current_sha() == sha:
            log.info(
                "node %s: rollout %s: %s %s already active",
                self.node_id,
                rid,
                d.model.name,
                d.model.version,
            )
            self._report(d, UpdateState.ACTIVE, 1.0)
            return
        log.info(
            "node %s: rollout %s: updating to %s %s (%s)",
            self.node_id,
            rid,
            d.model.name,
            d.model.version,
            sha[:12],
        )
        self._report(d, UpdateState.PENDING, 0.0)
        try:
            model = self._obtain(d, generation)
            if self._superseded(generation):
                return
            if sha in self._revoked:  # revoked while it was being fetched
                raise UpdateFailed(UpdateErrorCode.REVOKED, f"{model.bundle} was revoked")
            self._activate(model, None)
            self.store.set_active(sha)
            self._report(d, UpdateState.ACTIVE, 1.0)
            log.info(
                "node %s: rollout %s: %s %s active",
                self.node_id,
                rid,
                d.model.name,
                d.model.version,
            )
        except FetchCancelled:
            log.info("node %s: rollout %s: superseded by a newer desired model", self.node_id, rid)
        except UpdateFailed as exc:
            self._failed(d, exc.code, str(exc))
        except LoadFailure as exc:
            self._failed(d, as_update_error(exc.code), str(exc))
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            code = UpdateErrorCode.DISK_FULL if full else UpdateErrorCode.INTERNAL
            self._failed(d, code, f"{type(exc).__name__}: {exc}")

    def _obtain(self, d: DesiredModel, generation: int) -> ServingModel:
        """The desired bundle compiled: from the store if it is there and intact,
        otherwise downloaded (again)."""

        def progress(state: UpdateState, fraction: float) -> None:
            self._report(d, state, fraction)

        bundle = self.source.verified(
            d.model.manifest_sha256, d.rollout_id, progress, lambda: self._superseded(generation)
        )
        self._report(d, UpdateState.ACTIVATING, 1.0)
        return self.loader.compile(bundle)

    # -- shadow orders -----------------------------------------------------------------
    def _stop_shadow(self, why: str) -> None:
        if self.shadow is not None and self.shadow.scorer.current() is not None:
            self.shadow.scorer.stop(why)

    def _reconcile_shadow(self, order: ShadowOrder, generation: int) -> None:
        """Carry out the hub's shadow order (see the module docstring)."""
        setup = self.shadow
        assert setup is not None
        scorer = setup.scorer
        current = scorer.current()
        if order.model is None:
            self._stop_shadow(f"the hub ended rollout {order.rollout_id}'s shadow phase")
            self.store.pin_shadow(None)
            return
        model, rid = order.model, order.rollout_id
        if current is not None and (current.rollout_id, current.model) == (rid, model):
            scorer.set_rate(order)  # the same order again (a reconnect, a hub restart)
            return
        self._stop_shadow(f"rollout {rid} asks for {model}")
        sha = model.manifest_sha256
        if sha in self._revoked:
            scorer.failed(rid, model, UpdateErrorCode.REVOKED, f"{model} is revoked")
            return

        def progress(state: UpdateState, fraction: float) -> None:
            scorer.report(rid, model, ShadowState.LOADING, progress=fraction)

        log.info("node %s: rollout %s: loading %s to shadow", self.node_id, rid, model)
        progress(UpdateState.PENDING, 0.0)
        try:
            bundle = self.source.verified(
                sha, rid, progress, lambda: self._shadow_superseded(generation)
            )
            if bundle.manifest_sha256 != sha:
                raise UpdateFailed(UpdateErrorCode.HASH_MISMATCH, "not the bundle ordered")
            check_beside(bundle, setup.serving(), setup.min_free_mb)
            self.store.pin_shadow(sha)
            candidate = self.loader.compile(bundle, setup.engine)
        except FetchCancelled:
            log.info("node %s: rollout %s: shadow order superseded", self.node_id, rid)
            return
        except ShadowRefused as exc:
            scorer.failed(rid, model, exc.code, str(exc))
            return
        except UpdateFailed as exc:
            scorer.failed(rid, model, exc.code, str(exc))
            return
        except LoadFailure as exc:
            scorer.failed(rid, model, as_update_error(exc.code), str(exc))
            return
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            code = UpdateErrorCode.DISK_FULL if full else UpdateErrorCode.INTERNAL
            scorer.failed(rid, model, code, f"{type(exc).__name__}: {exc}")
            return
        if self._shadow_superseded(generation):
            return
        scorer.start(order, candidate)

    # -- revocations -------------------------------------------------------------------
    def _apply_revocations(self, incoming: RevocationList) -> None:
        """Take the incoming list's new revocations that a trusted release key signed;
        never drop one this node knows (a list that leaves one out is refused as a
        replacement and logged: a hub restored from an older backup, or an impostor)."""
        known = self.store.revoked()
        merged = merge_revocations(
            known, incoming, self.loader.trusted, allow_unsigned=self.loader.allow_unsigned
        )
        for rev, why in merged.refused:
            log.error(
                "node %s: revocation of %s %s (%s) refused: %s",
                self.node_id,
                rev.name,
                rev.version,
                rev.manifest_sha256[:12],
                why,
            )
        if merged.dropped:
            log.error(
                "node %s: refused a revocation list that leaves out %d known revocation(s) "
                "(%s): a revocation is final, they stay",
                self.node_id,
                len(merged.dropped),
                ", ".join(f"{r.name} {r.version}" for r in merged.dropped),
            )
        revocations = merged.known
        if known is None or merged.added:
            try:
                self.store.save_revoked(revocations)
            except OSError as exc:  # still applied now; the next start learns it again
                log.error("node %s: cannot store the revocation list: %s", self.node_id, exc)
        self._revoked = self._revoked | revocations.shas()
        current = self._current_sha()
        if current is None or current not in self._revoked:
            return
        entry = revocations.find(current)
        what = f"{entry.name} {entry.version}" if entry else current[:12]
        reason = entry.reason if entry else "no reason given"
        candidates = [Candidate(self.store.path(s), s) for s in self.store.previous()]
        model, chosen, failures = self.loader.first_good(candidates, self._revoked)
        for c, failure in failures:
            log.warning("node %s: cannot fall back to %s: %s", self.node_id, c.label(), failure)
        if model is None or chosen is None or chosen.sha is None:
            message = f"{what} was revoked ({reason}) and no earlier bundle loads: no_model"
            log.error("node %s: %s", self.node_id, message)
            self._deactivate(ModelError(code=ModelErrorCode.REVOKED, message=message))
            return
        message = f"{what} was revoked ({reason}): serving {model.bundle} instead"
        log.warning("node %s: %s", self.node_id, message)
        self._activate(model, ModelError(code=ModelErrorCode.REVOKED, message=message))
        self.store.set_active(chosen.sha)
