"""The push protocol: how a signed bundle reaches the registry (operator -> hub).

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
"""

from __future__ import annotations

import base64
import binascii
import logging
import re

from cellwatch.hub.errors import ApiFailure, StoreError
from cellwatch.hub.records import ModelRecord
from cellwatch.hub.registry import Registry, model_info
from cellwatch.shared.bundle import load_bundle, parse_manifest, sha256_bytes, verify_signature
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import BundleError
from cellwatch.shared.hubapi import (
    PushBeginArgs,
    PushBeginReply,
    PushCommitArgs,
    PushCommitReply,
    UploadAck,
    UploadFile,
)
from cellwatch.shared.limits import MAX_FETCH_CHUNK_BYTES, MAX_MANIFEST_BYTES
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from cellwatch.shared.rpc.transfer import Chunk

log = logging.getLogger(__name__)

MAX_UPLOAD_CHUNK_BYTES = MAX_FETCH_CHUNK_BYTES
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiFailure(ApiErrorCode.BAD_REQUEST, f"{what} is not valid base64") from exc


class Push:
    """The hub's side of push.begin, the uploaded chunks and push.commit, over one registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.db = registry.db
        self.store = registry.store
        self.trusted = registry.trusted
        self.allow_unsigned = registry.allow_unsigned
        self._manifests: dict[str, Manifest] = {}

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
            return PushBeginReply(status="already_present", model=self.registry.info(stored))
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
            return PushCommitReply(status="already_present", model=self.registry.info(stored))
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
