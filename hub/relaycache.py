"""A site relay's cache of bundles, content-addressed like the hub's store
(hub/store.py), and checked before anything in it is served.

    CACHE/bundles/{manifest_sha256}/{file}   files that passed their check
    CACHE/incoming/{manifest_sha256}/{file}  files on their way from the hub
                                             (`{file}.part` growing in order: a relay
                                             that restarts resumes there)

A file enters bundles/ only after its check: manifest.json's SHA-256 is the bundle's
address; manifest.sig verifies against it with a trusted key; every other file has
the size and SHA-256 the manifest lists. The cache remembers, for each checked file,
its size, inode, mtime and ctime: a file changed on disk since (any write changes its
ctime) is checked again before it is served, and removed if it fails, so the relay
fetches it again. Nodes still check every hash and the signature themselves: a relay,
or whoever can write its disk, cannot make a node take a bundle the release key did
not sign (tests/sites/test_sites.py).

The cache holds at most `max_bytes`: the bundles used least recently make room
(`reserve`), and a bundle that still does not fit raises CacheFull, as a full disk
(ENOSPC) does.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cellwatch.hub.errors import HubError
from cellwatch.shared.bundle import (
    check_file_name,
    parse_manifest,
    sha256_bytes,
    verify_file,
    verify_signature,
)
from cellwatch.shared.errors import BundleError
from cellwatch.shared.limits import MAX_MANIFEST_BYTES
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from cellwatch.shared.signing import TrustedKeys

log = logging.getLogger(__name__)


class CacheFull(HubError):
    """No room for a bundle: the cache's max_bytes, or the disk itself."""


@dataclass(frozen=True)
class Token:
    """What a file looked like on disk when it passed its check."""

    size: int
    ino: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Token:
        return cls(st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class RelayCache:
    def __init__(
        self, root: Path, max_bytes: int, trusted: TrustedKeys, *, allow_unsigned: bool = False
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.trusted = trusted
        self.allow_unsigned = allow_unsigned
        self.bundles = root / "bundles"
        self.incoming_dir = root / "incoming"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._checked: dict[tuple[str, str], Token] = {}
        self._manifests: dict[str, Manifest] = {}
        self._used: dict[str, float] = {
            d.name: d.stat().st_mtime for d in self.bundles.iterdir() if d.is_dir()
        }
        """Bundle -> when a node last asked for one of its files (LRU)."""

    # -- serving ------------------------------------------------------------------------
    def ready(self, sha: str, name: str) -> Path | None:
        """The cached file `name` of bundle sha if it is there and passed its check (again,
        if it changed on disk since: one that fails is removed); None otherwise."""
        path = self.bundles / sha / name
        try:
            check_file_name(name)
            st = path.stat()
        except (BundleError, OSError):
            return None
        with self._lock:
            self._used[sha] = time.time()
            known = self._checked.get((sha, name))
        if known == Token.of(st):
            return path
        try:
            self._check(sha, name, path)
        except (BundleError, OSError) as exc:
            log.warning(
                "relay cache: %s of %s failed its check (%s): removed, fetching it again",
                name,
                sha[:12],
                exc,
            )
            self._remove(sha, name)
            return None
        with self._lock:
            self._checked[(sha, name)] = Token.of(path.stat())
        return path

    def manifest(self, sha: str) -> Manifest | None:
        """Bundle sha's manifest, once its manifest.json is in the cache."""
        with self._lock:
            cached = self._manifests.get(sha)
        if cached is not None:
            return cached
        if self.ready(sha, MANIFEST_FILE) is None:
            return None
        with self._lock:
            return self._manifests.get(sha)

    def size(self, name: str, manifest: Manifest | None) -> int | None:
        """The size a file must have (None: unknown, manifest.json and manifest.sig)."""
        entry = manifest.files.get(name) if manifest is not None else None
        return entry.size if entry is not None else None

    # -- filling ------------------------------------------------------------------------
    def incoming(self, sha: str, name: str) -> Path:
        """Where file `name` of bundle sha is downloaded to (resumed if partly there)."""
        d = self.incoming_dir / sha
        d.mkdir(parents=True, exist_ok=True)
        return d / check_file_name(name)

    def admit(self, sha: str, name: str) -> Path:
        """Check the downloaded file and move it into the cache; BundleError (and the
        download removed) if it fails its check."""
        src = self.incoming_dir / sha / name
        try:
            self._check(sha, name, src)
        except BundleError:
            src.unlink(missing_ok=True)
            raise
        dest_dir = self.bundles / sha
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / name
        os.replace(src, dest)
        with self._lock:
            self._checked[(sha, name)] = Token.of(dest.stat())
            self._used[sha] = time.time()
        return dest

    def reserve(self, sha: str, total: int, keep: frozenset[str] = frozenset()) -> None:
        """Make room for a bundle of total bytes: remove the bundles used least recently
        (not sha, nor those in keep); CacheFull if it still does not fit."""
        if total > self.max_bytes:
            raise CacheFull(
                f"bundle {sha[:12]} is {total} bytes, more than the cache holds "
                f"(max_cache_bytes {self.max_bytes})"
            )
        while self.usage(exclude=sha) + total > self.max_bytes:
            if not self.evict(exclude=keep | {sha}):
                raise CacheFull(
                    f"no room for bundle {sha[:12]} ({total} bytes) in the cache "
                    f"(max_cache_bytes {self.max_bytes}; the rest is in use)"
                )

    def evict(self, exclude: frozenset[str] = frozenset()) -> str | None:
        """Remove the bundle used least recently (not one in exclude); which, or None."""
        with self._lock:
            candidates = sorted(
                (when, sha) for sha, when in self._used.items() if sha not in exclude
            )
        for _, sha in candidates:
            if (self.bundles / sha).exists():
                self.discard(sha)
                log.info("relay cache: bundle %s removed to make room", sha[:12])
                return sha
        return None

    def discard(self, sha: str) -> None:
        """Forget bundle sha (cached and incoming files)."""
        with self._lock:
            self._used.pop(sha, None)
            self._manifests.pop(sha, None)
            for key in [k for k in self._checked if k[0] == sha]:
                del self._checked[key]
        shutil.rmtree(self.bundles / sha, ignore_errors=True)
        self.discard_incoming(sha)

    def discard_incoming(self, sha: str) -> None:
        path = self.incoming_dir / sha
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def usage(self, exclude: str | None = None) -> int:
        """Bytes of the cache (cached and incoming), without bundle `exclude`'s."""
        total = 0
        for top in (self.bundles, self.incoming_dir):
            for d in top.iterdir():
                if d.name == exclude or not d.is_dir():
                    continue
                total += sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        return total

    # -- checks -------------------------------------------------------------------------
    def _check(self, sha: str, name: str, path: Path) -> None:
        """BundleError unless the file at path is what bundle sha's `name` must be."""
        if name == MANIFEST_FILE:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"manifest.json is over {MAX_MANIFEST_BYTES} bytes")
            data = path.read_bytes()
            if sha256_bytes(data) != sha:
                raise BundleError(f"manifest.json does not hash to {sha[:12]}")
            manifest = parse_manifest(data)
            with self._lock:
                self._manifests[sha] = manifest
            return
        manifest_path = self.bundles / sha / MANIFEST_FILE
        if self.ready(sha, MANIFEST_FILE) is None:
            raise BundleError(f"{name} of {sha[:12]} before its manifest")
        if name == SIGNATURE_FILE:
            verify_signature(
                manifest_path.read_bytes(),
                path.read_bytes(),
                self.trusted,
                allow_unsigned=self.allow_unsigned,
            )
            return
        with self._lock:
            manifest = self._manifests[sha]
        entry = manifest.files.get(name)
        if entry is None:
            raise BundleError(f"bundle {sha[:12]} has no file {name}")
        verify_file(path, entry)

    def _remove(self, sha: str, name: str) -> None:
        with self._lock:
            self._checked.pop((sha, name), None)
            if name == MANIFEST_FILE:
                self._manifests.pop(sha, None)
        (self.bundles / sha / name).unlink(missing_ok=True)
