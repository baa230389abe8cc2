"""The node's on-disk bundle store: verified bundles, resumable downloads, history.

    STORE/bundles/{manifest_sha256}/   bundles; each one counts only with its marker:
    STORE/complete/{manifest_sha256}   written once the directory above is in place
    STORE/staging/{manifest_sha256}/   downloads in progress: `{file}.part` grows by
                                       whole verified chunks, renamed to `{file}` when done
    STORE/trash/                       bundles being deleted
    STORE/active                       manifest sha256 of the bundle being served
    STORE/history                      activated bundles, oldest first (for pruning)
    STORE/shadow                       manifest sha256 of the shadow candidate (kept)
    STORE/revoked.json                 the hub's revocation list as last received

Crash-safe: a bundle enters by one rename of a complete directory, then its marker;
it leaves by losing its marker, then one rename into trash/, then deletion. What a
crash leaves half-done (a directory without its marker, anything in trash/) is
cleared when the store is opened; `has()` looks only at markers. Whether a bundle's
files are intact is checked on use (the node verifies every hash and the signature
before it compiles a bundle): one that fails is discarded and fetched again.

The last `keep` activated bundles stay on disk, so a rollback needs no download; the
shadow candidate (node/shadow.py) stays too, so a restarted node resumes its shadow
phase without a download. It is never a fallback: only activated bundles are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from pydantic import ValidationError

from cellwatch.shared.bundle import parse_manifest
from cellwatch.shared.errors import BundleError
from cellwatch.shared.manifest import MANIFEST_FILE
from cellwatch.shared.schemas import RevocationList

log = logging.getLogger(__name__)

REVOKED_FILE = "revoked.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _looks_complete(d: Path) -> bool:
    """Every file the manifest lists is there with its size (hashes are checked on use)."""
    try:
        manifest = parse_manifest((d / MANIFEST_FILE).read_bytes())
        return all(
            (d / name).is_file() and (d / name).stat().st_size == e.size
            for name, e in manifest.files.items()
        )
    except (OSError, BundleError):
        return False


class BundleStore:
    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep
        self.bundles = root / "bundles"
        self.markers = root / "complete"
        self.staging_root = root / "staging"
        self.trash = root / "trash"
        older_store = self.bundles.is_dir() and not self.markers.is_dir()
        for d in (self.bundles, self.markers, self.staging_root, self.trash):
            d.mkdir(parents=True, exist_ok=True)
        self._recover(older_store)

    def _recover(self, older_store: bool) -> None:
        """Finish what a crash interrupted (see the module docstring)."""
        for leftover in self.trash.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        for d in self.bundles.iterdir():
            if (self.markers / d.name).is_file():
                continue
            if older_store and _looks_complete(d):
                # A store written before the markers: its bundles arrived by rename.
                (self.markers / d.name).touch()
                continue
            log.warning("store: bundle %s was not completely written: removed", d.name[:12])
            self._remove(d)
        for marker in self.markers.iterdir():
            if not (self.bundles / marker.name).is_dir():
                marker.unlink()

    def _remove(self, d: Path) -> None:
        """Rename d into trash/, then delete it (a crash in between: deleted at open)."""
        gone = self.trash / f"{d.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.replace(d, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    # -- bundles ------------------------------------------------------------------------
    def has(self, sha: str) -> bool:
        return (self.markers / sha).is_file()

    def path(self, sha: str) -> Path:
        return self.bundles / sha

    def staging(self, sha: str) -> Path:
        d = self.staging_root / sha
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _enter(self, sha: str, src: Path) -> Path:
        """Move the complete directory src in as bundle sha (rename, then marker)."""
        dst = self.bundles / sha
        if self.has(sha):
            shutil.rmtree(src, ignore_errors=True)
            return dst
        if dst.exists():  # a directory without its marker: not trusted
            self._remove(dst)
        os.replace(src, dst)
        (self.markers / sha).touch()
        return dst

    def import_dir(self, sha: str, src: Path) -> Path:
        """Copy a bundle directory (e.g. the configured start bundle) into the store."""
        if self.has(sha):
            return self.bundles / sha
        tmp = self.staging_root / f"{sha}.import"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        return self._enter(sha, tmp)

    def discard_staging(self, sha: str) -> None:
        shutil.rmtree(self.staging_root / sha, ignore_errors=True)

    def promote(self, sha: str) -> Path:
        """Move a completely downloaded staging dir into the store."""
        return self._enter(sha, self.staging_root / sha)

    def discard(self, sha: str) -> None:
        """Forget bundle sha (it failed its verification): marker first, then the files.
        It leaves the history too; the next desired model naming it fetches it again."""
        (self.markers / sha).unlink(missing_ok=True)
        self._remove(self.bundles / sha)
        hist = self.history()
        if sha in hist:
            self._write_history([h for h in hist if h != sha])
        log.warning("store: bundle %s discarded", sha[:12])

    # -- what is served -----------------------------------------------------------------
    def active(self) -> str | None:
        p = self.root / "active"
        sha = p.read_text().strip() if p.is_file() else ""
        return sha if sha and self.has(sha) else None

    def history(self) -> list[str]:
        p = self.root / "history"
        return [s for s in p.read_text().split() if s] if p.is_file() else []

    def previous(self) -> list[str]:
        """Bundles activated before the active one that are still here, newest first."""
        active = self.active()
        return [s for s in reversed(self.history()) if s != active and self.has(s)]

    def _write_history(self, hist: list[str]) -> None:
        _atomic_write(self.root / "history", "".join(f"{h}\n" for h in hist))

    def set_active(self, sha: str) -> None:
        _atomic_write(self.root / "active", sha + "\n")
        self._write_history([s for s in self.history() if s != sha] + [sha])
        self.prune()

    def shadow(self) -> str | None:
        """The shadow candidate kept from pruning (None: none)."""
        p = self.root / "shadow"
        sha = p.read_text().strip() if p.is_file() else ""
        return sha or None

    def pin_shadow(self, sha: str | None) -> None:
        """Keep sha (the shadow candidate) from pruning; None: keep none."""
        if sha is None:
            (self.root / "shadow").unlink(missing_ok=True)
        else:
            _atomic_write(self.root / "shadow", sha + "\n")

    def prune(self) -> None:
        """Keep the `keep` most recently activated bundles (and the shadow candidate);
        delete older ones."""
        hist = self.history()
        keep = set(hist[-self.keep :]) | ({s} if (s := self.shadow()) else set())
        for d in self.bundles.iterdir():
            if d.name not in keep:
                log.info("store: removing old bundle %s", d.name[:12])
                (self.markers / d.name).unlink(missing_ok=True)
                self._remove(d)
        self._write_history([h for h in hist if h in keep])

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- revocations --------------------------------------------------------------------
    def revoked(self) -> RevocationList | None:
        """The revocation list last received from the hub (None: never one)."""
        p = self.root / REVOKED_FILE
        try:
            return RevocationList.model_validate_json(p.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, json.JSONDecodeError) as exc:
            log.error("store: %s is unreadable (%s): ignored until the hub sends it", p, exc)
            return None

    def save_revoked(self, revoked: RevocationList) -> None:
        _atomic_write(self.root / REVOKED_FILE, revoked.to_json().decode())
