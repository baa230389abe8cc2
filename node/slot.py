"""The model slot: the one compiled model the node serves, swapped whole, and the
choice of the bundle it starts with.

`activate` serves a model from now on; inferences already started finish on the
model they began with: the old one is retired (it starts nothing more) and kept
until its last inference ended (`watched`, which the watchdog polls, lets it go).
`deactivate` serves nothing (images are answered `no_model`). Each change is passed
on (`on_change`: the node republishes its status).

The start bundle (`serve_start_bundle`): with a bundle store, the bundle active
before a restart wins over the configured one, which is copied into the store so that
a rollback to it needs no download. When the active bundle does not load or was
revoked, the earlier ones in the store are tried, newest first, then the configured
one; when none loads, the node serves nothing, so that the hub can send it another
bundle. Either way the slot's `error` says why. A node without a bundle store, which
the hub cannot help, refuses to start instead (LoadFailure).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from cellwatch.node.engine import CompletionCallback, ServingModel
from cellwatch.node.faults import Faults
from cellwatch.node.loader import BundleLoader, Candidate
from cellwatch.node.store import BundleStore
from cellwatch.shared.codes import ModelErrorCode
from cellwatch.shared.schemas import ModelError

log = logging.getLogger(__name__)


class ModelSlot:
    def __init__(
        self,
        node_id: str,
        *,
        faults: Faults,
        on_inferred: CompletionCallback,
        on_change: Callable[[], None],
    ) -> None:
        self.node_id = node_id
        self.faults = faults
        self._on_inferred = on_inferred
        self._on_change = on_change
        self._lock = threading.Lock()
        self._model: ServingModel | None = None
        self._error: ModelError | None = None
        self._retired: list[ServingModel] = []
        self._served_before = False

    def current(self) -> ServingModel | None:
        """The model new images start on (None: answer no_model)."""
        return self._model

    @property
    def error(self) -> ModelError | None:
        """Why the node does not serve the bundle it should (None: it does)."""
        return self._error

    @property
    def retired(self) -> list[ServingModel]:
        """Models swapped out whose inferences have not all ended."""
        with self._lock:
            return list(self._retired)

    def activate(self, model: ServingModel, error: ModelError | None = None) -> None:
        """Serve model from now on. error: what the status says of it (e.g. a fallback:
        why not the active one)."""
        if not self._served_before:
            model.inject(self.faults)  # the seam's inference points: the first model only
        self._served_before = True
        model.set_callback(self._on_inferred)
        self._swap(model, error)
        log.info("node %s: now serving %s", self.node_id, model.bundle)

    def deactivate(self, error: ModelError) -> None:
        """Serve no model (answer no_model) from now on, and say why."""
        self._swap(None, error)
        log.error("node %s: serving no model: %s", self.node_id, error.message)

    def _swap(self, model: ServingModel | None, error: ModelError | None) -> None:
        with self._lock:
            old, self._model = self._model, model
            self._error = error
            if old is not None:
                old.retire()
                self._retired.append(old)
        self._on_change()

    def watched(self) -> list[ServingModel]:
        """Every model with inferences that may still end (the current and the retired
        ones); a retired model with none left is let go here."""
        with self._lock:
            models = [m for m in (self._model, *self._retired) if m is not None]
            self._retired = [m for m in self._retired if m.pending > 0]
        return models


def start_candidates(store: BundleStore | None, configured: Path | None) -> list[Candidate]:
    """The bundles to try at start, in order (see the module docstring)."""
    out: list[Candidate] = []
    if store is not None:
        active = store.active()
        if active is not None:
            out.append(Candidate(store.path(active), active))
        out += [Candidate(store.path(s), s) for s in store.previous()]
    if configured is not None:
        out.append(Candidate(configured))
    return out


def serve_start_bundle(
    slot: ModelSlot,
    loader: BundleLoader,
    store: BundleStore | None,
    configured: Path | None,
    revoked: frozenset[str],
) -> None:
    """Serve the first start candidate that loads (see the module docstring)."""
    node_id = slot.node_id
    candidates = start_candidates(store, configured)
    if not candidates:
        log.warning("node %s: no bundle configured; answering no_model", node_id)
        return
    model, chosen, failures = loader.first_good(candidates, revoked)
    error = None
    if failures:
        first, why = failures[0]
        serving = f"; serving {model.bundle} instead" if model else "; answering no_model"
        error = ModelError(code=why.code, message=f"{first.label()}: {why}{serving}"[:2048])
        for c, failure in failures:
            if failure.code is ModelErrorCode.HASH_MISMATCH and c.sha and store:
                store.discard(c.sha)  # damaged: the next desired fetches it again
    if model is None or chosen is None:
        assert error is not None
        if store is None:
            # Without a bundle store the hub cannot send another bundle: a clear
            # error now (exit code 2) helps more than a node answering no_model.
            raise failures[0][1]
        slot.deactivate(error)
        return
    slot.activate(model, error)
    if store is not None:
        sha = model.bundle.manifest_sha256
        try:
            if chosen.sha is None:  # the configured bundle: keep a copy for rollbacks
                store.import_dir(sha, chosen.path)
            if store.active() != sha:
                store.set_active(sha)
        except OSError as exc:  # e.g. a full disk: it serves anyway
            log.error("node %s: cannot record %s in the store: %s", node_id, sha[:12], exc)
