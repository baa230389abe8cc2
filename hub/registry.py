"""The model registry: the stored models and the revocations.

Bundles reach it through the push protocol (hub/push.py, `registry.push`).

Revocation (`models.revoke`): signed by a release key the hub trusts (the operator's
CLI signs it, `--sign-key`); a revoked model is never rolled out again, nor pushed
again, nor served to a node that asks for its files; the hub publishes the signed
revocations for the nodes (hub/service.py, `{prefix}/hub/revoked`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.records import ModelRecord
from cellwatch.hub.store import BundleStore
from cellwatch.shared.bundle import load_bundle, parse_manifest
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import BundleError, SignatureError
from cellwatch.shared.hubapi import (
    ModelInfo,
)
from cellwatch.shared.manifest import (
    MANIFEST_FILE,
    MODEL_FLAGS,
    Manifest,
    model_flags,
)
from cellwatch.shared.revocations import verify_revocation
from cellwatch.shared.schemas import Revocation, RevocationList
from cellwatch.shared.signing import TrustedKeys

log = logging.getLogger(__name__)


def provenance_badges(provenance: dict[str, Any]) -> dict[str, bool]:
    """ModelInfo's synthetic / untrained / degraded from the manifest's provenance
    (shared.manifest.model_flags: the one rule)."""
    flags = model_flags(provenance)
    return {flag.replace("-", "_"): flag in flags for flag in MODEL_FLAGS}


def model_info(m: ModelRecord) -> ModelInfo:
    return ModelInfo(
        revoked_at=datetime.fromtimestamp(m.revoked_at, UTC) if m.revoked_at is not None else None,
        revoke_reason=m.revoke_reason,
        name=m.name,
        version=m.version,
        manifest_sha256=m.manifest_sha256,
        size=m.size,
        precision=m.precision,
        signer=m.signer,
        metrics=m.metrics,
        created_at=datetime.fromisoformat(m.created_at),
        pushed_at=datetime.fromtimestamp(m.pushed_at, UTC),
        **provenance_badges(m.provenance),
    )


class Registry:
    def __init__(
        self, db: Database, store: BundleStore, trusted: TrustedKeys, *, allow_unsigned: bool
    ) -> None:
        self.db = db
        self.store = store
        self.trusted = trusted
        self.allow_unsigned = allow_unsigned
        self._stored: dict[str, Manifest] = {}
        self._backfill_provenance()
        for m in self.db.revoked_models():
            store.refuse(m.manifest_sha256)
        for rev in self.db.revocations():
            store.refuse(rev.manifest_sha256)

    def _backfill_provenance(self) -> None:
        """Models stored before the database kept provenance: read it from the store."""
        for m in self.db.models():
            if m.provenance or not self.store.has(m.manifest_sha256):
                continue
            try:
                path = self.store.path(m.manifest_sha256) / MANIFEST_FILE
                manifest = parse_manifest(path.read_bytes())
            except (BundleError, OSError) as exc:
                log.warning("registry: %s %s: cannot read its manifest: %s", m.name, m.version, exc)
                continue
            if manifest.provenance_json():
                self.db.set_provenance(m.manifest_sha256, manifest.provenance_json())

    # -- queries -------------------------------------------------------------------------
    def models(self, name: str | None = None) -> list[ModelInfo]:
        return [self.info(m) for m in self.db.models(name)]

    def info(self, m: ModelRecord) -> ModelInfo:
        return model_info(m)

    def stored_manifest(self, sha: str) -> Manifest | None:
        """The manifest of a stored bundle (cached: stored bundles never change)."""
        cached = self._stored.get(sha)
        if cached is not None:
            return cached
        try:
            manifest = parse_manifest((self.store.path(sha) / MANIFEST_FILE).read_bytes())
        except (OSError, BundleError) as exc:
            log.warning("cannot read the manifest of stored bundle %s: %s", sha[:12], exc)
            return None
        self._stored[sha] = manifest
        return manifest

    def find(self, name: str, version: str) -> ModelRecord:
        m = self.db.model(name, version)
        if m is None or not self.store.has(m.manifest_sha256):
            known = sorted(x.version for x in self.db.models(name))
            hint = f" (known versions: {', '.join(known)})" if known else " (no such model)"
            raise ApiFailure(ApiErrorCode.NOT_FOUND, f"no model {name} {version} on the hub{hint}")
        return m

    def find_servable(self, name: str, version: str) -> ModelRecord:
        """A stored model that may be rolled out: not revoked, and its stored copy
        intact (a damaged one is dropped: push it again)."""
        m = self.find(name, version)
        if m.revoked:
            raise ApiFailure(
                ApiErrorCode.REVOKED,
                f"{name} {version} was revoked ({m.revoke_reason}): it cannot be rolled out",
            )
        try:
            load_bundle(
                self.store.path(m.manifest_sha256), self.trusted, allow_unsigned=self.allow_unsigned
            )
        except BundleError as exc:
            self.store.discard(m.manifest_sha256)
            raise ApiFailure(
                ApiErrorCode.INVALID_BUNDLE,
                f"the hub's copy of {name} {version} failed its verification ({exc}): it was "
                "removed; push the bundle again",
            ) from exc
        return m

    def revoke(self, rev: Revocation, now: float) -> ModelRecord:
        """Revoke a stored model with a signed revocation (again: nothing changes, the
        first revocation stays); its record after. ApiFailure if the model is unknown,
        the revocation names another bundle, or no trusted key signed it."""
        m = self.db.model(rev.name, rev.version)
        if m is None:
            raise ApiFailure(
                ApiErrorCode.NOT_FOUND, f"no model {rev.name} {rev.version} on the hub"
            )
        if m.manifest_sha256 != rev.manifest_sha256:
            raise ApiFailure(
                ApiErrorCode.BAD_REQUEST,
                f"the revocation names bundle {rev.manifest_sha256[:12]}, but {m.name} "
                f"{m.version} on the hub is {m.manifest_sha256[:12]}",
            )
        if not m.revoked:
            signer = self._verify(rev)
            self.db.add_revocation(rev, now)
            self.store.refuse(m.manifest_sha256)
            log.warning(
                "registry: %s %s revoked (signed by %s): %s",
                rev.name,
                rev.version,
                signer or "nobody",
                rev.reason,
            )
        revoked = self.db.model(rev.name, rev.version)
        assert revoked is not None
        return revoked

    def knows(self, rev: Revocation) -> bool:
        """Whether the bundle rev names is revoked here already."""
        sha = rev.manifest_sha256
        return any(r.manifest_sha256 == sha for r in self.db.revocations()) or any(
            m.manifest_sha256 == sha for m in self.db.revoked_models()
        )

    def add_revocation(self, rev: Revocation, now: float) -> bool:
        """Take a signed revocation learnt elsewhere (the retained list an earlier hub
        published: hub/control.py), also of a bundle this hub never stored; True if it
        is new. ApiFailure (bad_signature) if it is new and no trusted key signed it."""
        if self.knows(rev):
            return False
        self._verify(rev)
        if not self.db.add_revocation(rev, now):
            return False
        self.store.refuse(rev.manifest_sha256)
        log.warning("registry: learnt that %s %s is revoked: %s", rev.name, rev.version, rev.reason)
        return True

    def _verify(self, rev: Revocation) -> str | None:
        try:
            return verify_revocation(rev, self.trusted)
        except SignatureError as exc:
            if self.allow_unsigned:
                return None
            raise ApiFailure(
                ApiErrorCode.BAD_SIGNATURE,
                f"revocation of {rev.name} {rev.version} refused: {exc} (sign it with a "
                "release key the hub and the nodes trust: --sign-key)",
            ) from exc

    def revocations(self, now: float) -> RevocationList:
        """Every revocation, signed ones as signed; a model revoked before revocations
        were signed (hub schema 4) is listed unsigned."""
        signed = self.db.revocations()
        shas = {r.manifest_sha256 for r in signed}
        legacy = [
            Revocation(
                name=m.name,
                version=m.version,
                manifest_sha256=m.manifest_sha256,
                reason=m.revoke_reason or "",
                revoked_at=datetime.fromtimestamp(m.revoked_at or now, UTC),
            )
            for m in self.db.revoked_models()
            if m.manifest_sha256 not in shas
        ]
        return RevocationList(revoked=signed + legacy, issued_at=datetime.fromtimestamp(now, UTC))
