"""The hub's content-addressed bundle store.

    STORE/bundles/{manifest_sha256}/   verified bundles, never modified once there
    STORE/uploads/{manifest_sha256}/   pushes in progress: manifest.json, manifest.sig,
                                       `{file}.part` growing by whole chunks, renamed
                                       to `{file}` when complete

A push is committed by renaming its upload directory into bundles/ (atomic on one
file system), so a bundle directory is either complete and verified or absent.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from cellwatch.hub.errors import StoreError
from cellwatch.shared.bundle import check_file_name
from cellwatch.shared.errors import BundleError
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.rpc.transfer import PartFile, TransferError

log = logging.getLogger(__name__)


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._refused: set[str] = set()
        """Revoked bundles: kept, never handed out (file() says there is no file)."""
        self.bundles = root / "bundles"
        self.uploads = root / "uploads"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)

    # -- stored bundles --------------------------------------------------------------
    def has(self, sha: str) -> bool:
        return (self.bundles / sha / MANIFEST_FILE).is_file()

    def path(self, sha: str) -> Path:
        return self.bundles / sha

    def refuse(self, sha: str) -> None:
        """Never hand out a file of bundle sha again (it was revoked)."""
        self._refused.add(sha)

    def refused(self, sha: str) -> bool:
        """Whether bundle sha was revoked (file() hands out none of its files)."""
        return sha in self._refused

    def file(self, sha: str, name: str) -> Path | None:
        """The stored file `name` of bundle `sha`, or None if there is no such file or
        the bundle was revoked."""
        if sha in self._refused:
            log.warning("store: %s of revoked bundle %s refused", name, sha[:12])
            return None
        try:
            check_file_name(name)
        except BundleError:
            return None
        p = self.bundles / sha / name
        return p if p.is_file() else None

    def replace_signature(self, sha: str, signature: bytes) -> None:
        """Give stored bundle sha another manifest.sig (written aside, then renamed)."""
        target = self.bundles / sha / SIGNATURE_FILE
        tmp = self.uploads / f"{sha}.sig.tmp"
        try:
            tmp.write_bytes(signature)
            os.replace(tmp, target)
        except OSError as exc:
            raise StoreError(f"cannot replace the signature of {sha[:12]}: {exc}") from exc

    def discard(self, sha: str) -> None:
        """Drop a stored bundle that failed its verification (renamed aside first, so a
        crash leaves no half-deleted bundle where has() looks)."""
        src = self.bundles / sha
        gone = self.uploads / f"{sha}.discarded"
        shutil.rmtree(gone, ignore_errors=True)
        try:
            os.replace(src, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)
        log.warning("store: bundle %s removed (damaged)", sha[:12])

    def size(self, sha: str) -> int:
        return sum(p.stat().st_size for p in self.path(sha).iterdir() if p.is_file())

    # -- uploads -----------------------------------------------------------------------
    def upload_dir(self, sha: str) -> Path:
        d = self.uploads / sha
        d.mkdir(parents=True, exist_ok=True)
        return d

    def has_upload(self, sha: str) -> bool:
        return (self.uploads / sha / MANIFEST_FILE).is_file()

    def upload_file(self, sha: str, name: str, size: int | None = None) -> PartFile:
        """File `name` of upload sha as it arrives (shared/rpc/transfer.py: in order
        into `{name}.part`, renamed to `{name}` once it reaches size)."""
        return PartFile(self.uploads / sha / name, size)

    def received(self, sha: str, name: str) -> int:
        """Bytes of file `name` already uploaded (complete or partial)."""
        return self.upload_file(sha, name).received()

    def append(self, sha: str, name: str, offset: int, data: bytes, size: int) -> int:
        """Append data at offset (must equal the bytes received); returns the new total.
        StoreError for any other offset, more bytes than size, or a disk error."""
        try:
            return self.upload_file(sha, name, size).append(offset, data)
        except TransferError as exc:
            raise StoreError(f"upload of {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot write upload of {name}: {exc}") from exc

    def discard_upload(self, sha: str) -> None:
        shutil.rmtree(self.uploads / sha, ignore_errors=True)

    def commit(self, sha: str) -> Path:
        """Move the verified upload directory into the store (atomic rename)."""
        src, dst = self.uploads / sha, self.bundles / sha
        if dst.exists():
            self.discard_upload(sha)
            return dst
        try:
            os.replace(src, dst)
        except OSError as exc:
            raise StoreError(f"cannot store bundle {sha[:12]}: {exc}") from exc
        log.info("store: bundle %s stored", sha[:12])
        return dst
