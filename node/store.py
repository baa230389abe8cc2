"""The node's on-disk bundle store: verified bundles, resumable downloads, history.

    STORE/bundles/{manifest_sha256}/   complete bundles (verified again when loaded)
    STORE/staging/{manifest_sha256}/   downloads in progress: `{file}.part` grows by
                                       whole verified chunks, renamed to `{file}` when done
    STORE/active                       manifest sha256 of the bundle being served
    STORE/history                      activated bundles, oldest first (for pruning)

The last `keep` activated bundles stay on disk, so a rollback needs no download.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class BundleStore:
    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep
        self.bundles = root / "bundles"
        self.staging_root = root / "staging"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def has(self, sha: str) -> bool:
        return (self.bundles / sha / "manifest.json").is_file()

    def path(self, sha: str) -> Path:
        return self.bundles / sha

    def staging(self, sha: str) -> Path:
        d = self.staging_root / sha
        d.mkdir(parents=True, exist_ok=True)
        return d

    def import_dir(self, sha: str, src: Path) -> Path:
        """Copy a bundle directory (e.g. the configured start bundle) into the store."""
        dst = self.bundles / sha
        if not dst.exists():
            tmp = self.staging_root / f"{sha}.import"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            os.replace(tmp, dst)
        return dst

    def discard_staging(self, sha: str) -> None:
        shutil.rmtree(self.staging_root / sha, ignore_errors=True)

    def promote(self, sha: str) -> Path:
        """Move a completely downloaded staging dir into the store (atomic rename)."""
        src, dst = self.staging_root / sha, self.bundles / sha
        if dst.exists():
            shutil.rmtree(src, ignore_errors=True)
            return dst
        os.replace(src, dst)
        return dst

    def active(self) -> str | None:
        p = self.root / "active"
        sha = p.read_text().strip() if p.is_file() else ""
        return sha if sha and self.has(sha) else None

    def history(self) -> list[str]:
        p = self.root / "history"
        return [s for s in p.read_text().split() if s] if p.is_file() else []

    def set_active(self, sha: str) -> None:
        _atomic_write(self.root / "active", sha + "\n")
        hist = [s for s in self.history() if s != sha] + [sha]
        _atomic_write(self.root / "history", "\n".join(hist) + "\n")
        self.prune()

    def prune(self) -> None:
        """Keep the `keep` most recently activated bundles; delete older ones."""
        hist = self.history()
        keep = set(hist[-self.keep :])
        for d in self.bundles.iterdir():
            if d.name not in keep:
                log.info("store: removing old bundle %s", d.name[:12])
                shutil.rmtree(d, ignore_errors=True)
        _atomic_write(self.root / "history", "\n".join(h for h in hist if h in keep) + "\n")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
