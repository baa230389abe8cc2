"""The model registry: the push protocol and the list of stored models.

Push (operator -> hub), resumable and idempotent:
1. `push.begin` {manifest, signature} (base64): the hub checks the signature against
   ITS trusted keys and validates the manifest before accepting a byte more. Answer:
   `already_present` (same manifest sha256 stored: nothing to do), or `upload` with
   upload_id (= the manifest sha256) and, per file, its size and the offset the hub
   already has (a push interrupted earlier resumes there).
2. Chunks on `cellwatch/hub/api/upload` in the one chunk format (shared/rpc/transfer.py:
   the bytes, user properties offset, which must equal the bytes the hub has, sha256
   and total) with user properties upload_id and file; one UploadAck each.
3. `push.commit` {upload_id}: every file's size and SHA-256 and the signature are
   checked again on the assembled directory (shared.bundle.load_bundle), then it is
   moved into the store under its manifest sha256 in one rename.
A name and version already stored with a different manifest is a conflict. The
same manifest pushed again with another trusted signature (a key rotation: the
bundle re-signed with the new key) replaces the stored signature; nodes that verify
their copy against the new keys fetch it again.

Revocation (`models.revoke`): signed by a release key the hub trusts (the operator's
CLI signs it, `--sign-key`); a revoked model is never rolled out again, nor pushed
again, nor served to a node that asks for its files; the hub publishes the signed
revocations for the nodes (hub/service.py, `{prefix}/hub/revoked`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from datetime import UTC, datetime
from typing import Any

from cellwatch.hub.db import Database, ModelRecord
from cellwatch.hub.errors import ApiFailure, StoreError
from cellwatch.hub.store import BundleStore
from cellwatch.shared.bundle import load_bundle, parse_manifest, sha256_bytes, verify_signature
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import BundleError, SignatureError
from cellwatch.shared.hubapi import (
    ModelInfo,
    PushBeginArgs,
    PushBeginReply,
    PushCommitArgs,
    PushCommitReply,
    UploadAck,
    UploadFile,
)
from cellwatch.shared.limits import MAX_FETCH_CHUNK_BYTES, MAX_MANIFEST_BYTES
from cellwatch.shared.manifest import (
    MANIFEST_FILE,
    MODEL_FLAGS,
    SIGNATURE_FILE,
    Manifest,
    model_flags,
)
from cellwatch.shared.revocations import verify_revocation
from cellwatch.shared.rpc.transfer import Chunk
from cellwatch.shared.schemas import Revocation, RevocationList
from cellwatch.shared.signing import TrustedKeys

log = logging.getLogger(__name__)

MAX_UPLOAD_CHUNK_BYTES = MAX_FETCH_CHUNK_BYTES
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


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


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiFailure(ApiErrorCode.BAD_REQUEST, f"{what} is not valid base64") from exc


class Registry:
    def __init__(
        self, db: Database, store: BundleStore, trusted: TrustedKeys, *, allow_unsigned: bool
    ) -> None:
        self.db = db
        self.store = store
        self.trusted = trusted
        self.allow_unsigned = allow_unsigned
        self._manifests: dict[str, Manifest] = {}
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

    # -- push ------------------------------------------------------------------------------
    def begin(self, args: PushBeginArgs) -> PushBeginReply:
        manifest_bytes = _b64(args.manifest, "manifest")
        signature = _b64(args.signature, "signature") if args.signature is not None else None
        if len(manifest_bytes) > MAX_MANIFEST_BYTES:
            raise ApiFailure(ApiErrorCode.TOO_LARGE, f"manifest over {MAX_MANIFEST_BYTES} bytes")
        try:
            signer = verify_signature(
                manifest_bytes, signature, self.trusted, allow_unsigned=self.allow_unsigned
            )
            manifest = parse_manifest(manifest_bytes)
        except BundleError as exc:
            raise ApiFailure(ApiErrorCode.INVALID_BUNDLE, f"bundle refused: {exc}") from exc
        sha = sha256_bytes(manifest_bytes)
        stored = self.db.model_by_sha(sha)
        if stored is not None and stored.revoked:
            raise ApiFailure(
                ApiErrorCode.REVOKED,
                f"{stored.name} {stored.version} was revoked ({stored.revoke_reason}): "
                "give the bundle a new version",
            )
        if stored is not None and self.store.has(sha):
            if signature is not None and signer is not None and signer != stored.signer:
                stored = self._resign(stored, signature, signer)
            return PushBeginReply(status="already_present", model=self.info(stored))
        self._check_unique(manifest, sha)
        d = self.store.upload_dir(sha)
        (d / MANIFEST_FILE).write_bytes(manifest_bytes)
        if signature is not None:
            (d / SIGNATURE_FILE).write_bytes(signature)
        else:
            (d / SIGNATURE_FILE).unlink(missing_ok=True)
        self._manifests[sha] = manifest
        files = {
            name: UploadFile(size=e.size, offset=self.store.received(sha, name))
            for name, e in manifest.files.items()
        }
        log.info(
            "push: %s %s (%s) begins, signer %s",
            manifest.name,
            manifest.version,
            sha[:12],
            signer or "none",
        )
        return PushBeginReply(
            status="upload", upload_id=sha, files=files, chunk_bytes=MAX_UPLOAD_CHUNK_BYTES
        )

    def upload(self, upload_id: str, file: str, chunk: Chunk) -> UploadAck:
        """Store a chunk (its SHA-256 was checked on arrival) of a file of upload_id."""
        manifest = self._manifest(upload_id)
        entry = manifest.files.get(file)
        if entry is None:
            raise ApiFailure(
                ApiErrorCode.BAD_REQUEST, f"{file!r} is not a file of this bundle's manifest"
            )
        if len(chunk.data) > MAX_UPLOAD_CHUNK_BYTES:
            raise ApiFailure(
                ApiErrorCode.TOO_LARGE, f"upload chunk over {MAX_UPLOAD_CHUNK_BYTES} bytes"
            )
        if chunk.total is not None and chunk.total != entry.size:
            raise ApiFailure(
                ApiErrorCode.BAD_REQUEST,
                f"{file} is {entry.size} bytes in the manifest, the upload says {chunk.total}",
            )
        try:
            done = self.store.append(upload_id, file, chunk.offset, chunk.data, entry.size)
        except StoreError as exc:
            raise ApiFailure(ApiErrorCode.BAD_OFFSET, str(exc)) from exc
        return UploadAck(file=file, offset=done, complete=done == entry.size)

    def commit(self, args: PushCommitArgs, now: float) -> PushCommitReply:
        sha = args.upload_id
        stored = self.db.model_by_sha(sha)
        if stored is not None and self.store.has(sha):
            return PushCommitReply(status="already_present", model=self.info(stored))
        manifest = self._manifest(sha)
        missing = [
            f"{name} ({self.store.received(sha, name)} of {e.size} bytes)"
            for name, e in manifest.files.items()
            if not (self.store.uploads / sha / name).is_file()
        ]
        if missing:
            raise ApiFailure(ApiErrorCode.BAD_REQUEST, f"upload incomplete: {', '.join(missing)}")
        try:
            bundle = load_bundle(
                self.store.uploads / sha, self.trusted, allow_unsigned=self.allow_unsigned
            )
        except BundleError as exc:
            self.store.discard_upload(sha)
            self._manifests.pop(sha, None)
            raise ApiFailure(ApiErrorCode.INVALID_BUNDLE, f"bundle refused: {exc}") from exc
        self._check_unique(bundle.manifest, sha)
        path = self.store.commit(sha)
        self._manifests.pop(sha, None)
        record = ModelRecord(
            name=bundle.manifest.name,
            version=bundle.manifest.version,
            manifest_sha256=sha,
            size=sum(p.stat().st_size for p in path.iterdir()),
            precision=bundle.manifest.precision,
            signer=bundle.signer,
            metrics=bundle.manifest.metrics_json(),
            created_at=bundle.manifest.created_at.isoformat(),
            pushed_at=now,
            provenance=bundle.manifest.provenance_json(),
        )
        self.db.add_model(record)
        log.info("push: %s stored (signer %s)", bundle, bundle.signer or "none")
        return PushCommitReply(status="stored", model=model_info(record))

    def _resign(self, stored: ModelRecord, signature: bytes, signer: str) -> ModelRecord:
        """Keep the stored bundle, with the new (already verified) signature."""
        sha = stored.manifest_sha256
        self.store.replace_signature(sha, signature)
        self.db.set_signer(sha, signer)
        log.warning(
            "push: %s %s (%s) re-signed by %s (was %s)",
            stored.name,
            stored.version,
            sha[:12],
            signer,
            stored.signer or "none",
        )
        updated = self.db.model_by_sha(sha)
        assert updated is not None
        return updated

    def _manifest(self, sha: str) -> Manifest:
        cached = self._manifests.get(sha)
        if cached is not None:
            return cached
        if not _SHA_RE.match(sha) or not self.store.has_upload(sha):
            raise ApiFailure(
                ApiErrorCode.NOT_FOUND, f"no upload {sha[:12]!r} in progress: push.begin first"
            )
        try:
            manifest = parse_manifest((self.store.uploads / sha / MANIFEST_FILE).read_bytes())
        except (BundleError, OSError) as exc:
            self.store.discard_upload(sha)
            raise ApiFailure(
                ApiErrorCode.NOT_FOUND, f"upload {sha[:12]} is unusable: {exc}"
            ) from exc
        self._manifests[sha] = manifest
        return manifest

    def _check_unique(self, manifest: Manifest, sha: str) -> None:
        other = self.db.model(manifest.name, manifest.version)
        if other is not None and other.manifest_sha256 != sha:
            raise ApiFailure(
                ApiErrorCode.CONFLICT,
                f"{manifest.name} {manifest.version} is already stored with another manifest "
                f"({other.manifest_sha256[:12]}): give the new bundle a new version",
            )
