"""How the node comes by a verified bundle: from its store if the copy there is intact,
otherwise downloaded (again) from the hub (or its site's relay) and moved into the store.

The manifest and its signature come first and the signature is checked before any
large file is fetched; the files then arrive in resumable chunks (node/fetcher.py),
after a check that the disk holds them; the complete bundle is verified again (every
hash and the signature) before it enters the store. A failure raises UpdateFailed
with the code the update agent reports (node/updater.py), or the loader's LoadFailure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cellwatch.node.faults import FaultPoint, Faults
from cellwatch.node.fetcher import Fetcher, FetchError
from cellwatch.node.loader import BundleLoader, LoadFailure
from cellwatch.node.store import BundleStore
from cellwatch.shared.bundle import Bundle, parse_manifest, verify_signature
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.errors import BundleError, SignatureError
from cellwatch.shared.limits import MAX_MANIFEST_BYTES
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.states import UpdateState

log = logging.getLogger(__name__)

DISK_MARGIN_BYTES = 16 * 1024 * 1024
"""Free space a download leaves on the store's disk beyond the bundle's bytes."""
Progress = Callable[[UpdateState, float], None]
"""Where the agent says how far it got with a bundle (an UpdateReport, a ShadowReport)."""


class UpdateFailed(Exception):
    def __init__(self, code: UpdateErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class BundleSource:
    """A node's bundles by manifest sha256, verified, from its store or the hub."""

    def __init__(
        self,
        node_id: str,
        store: BundleStore,
        fetcher: Fetcher,
        loader: BundleLoader,
        faults: Faults,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.fetcher = fetcher
        self.loader = loader
        self.faults = faults

    def verified(
        self, sha: str, rollout_id: str, progress: Progress, cancelled: Callable[[], bool]
    ) -> Bundle:
        """Bundle sha from the store if it is there and intact, otherwise downloaded
        (again) and moved into the store; verified (LoadFailure, UpdateFailed)."""
        if self.store.has(sha):
            log.info(
                "node %s: rollout %s: %s is in the store, no download needed",
                self.node_id,
                rollout_id,
                sha[:12],
            )
            progress(UpdateState.VERIFYING, 1.0)
            try:
                return self.loader.verify(self.store.path(sha))
            except LoadFailure as exc:
                log.warning(
                    "node %s: stored bundle %s failed its verification (%s: %s): discarded, "
                    "fetching it again",
                    self.node_id,
                    sha[:12],
                    exc.code,
                    exc,
                )
                self.store.discard(sha)
        self._download(sha, progress, cancelled)
        progress(UpdateState.VERIFYING, 1.0)
        self._verify_staging(sha)
        self.faults.at(FaultPoint.STORE_PROMOTE)
        self.store.promote(sha)
        return self.loader.verify(self.store.path(sha))

    def _download(self, sha: str, report: Progress, cancelled: Callable[[], bool]) -> None:
        staging = self.store.staging(sha)
        try:
            for name in (MANIFEST_FILE, SIGNATURE_FILE):
                if not (staging / name).is_file():
                    self.fetcher.fetch(
                        sha, name, staging / name, max_size=MAX_MANIFEST_BYTES, cancelled=cancelled
                    )
            manifest_bytes = (staging / MANIFEST_FILE).read_bytes()
            verify_signature(
                manifest_bytes,
                (staging / SIGNATURE_FILE).read_bytes(),
                self.loader.trusted,
                allow_unsigned=self.loader.allow_unsigned,
            )
            manifest = parse_manifest(manifest_bytes)
            total = sum(e.size for e in manifest.files.values())
            have = sum(_size(staging / n) for n in manifest.files)
            if self.store.free_bytes() < total - have + DISK_MARGIN_BYTES:
                raise UpdateFailed(
                    UpdateErrorCode.DISK_FULL, f"need {total - have} bytes in {self.store.root}"
                )
            reported = [0.0]

            def progress(done: int, size: int) -> None:
                frac = (have_done[0] + done) / max(total, 1)
                if frac - reported[0] >= 0.1:
                    reported[0] = frac
                    report(UpdateState.DOWNLOADING, frac)

            have_done = [0]
            report(UpdateState.DOWNLOADING, 0.0)
            for name, entry in manifest.files.items():
                if not (staging / name).is_file():
                    self.fetcher.fetch(
                        sha,
                        name,
                        staging / name,
                        expected_size=entry.size,
                        cancelled=cancelled,
                        progress=progress,
                    )
                have_done[0] += entry.size
        except FetchError as exc:
            code = UpdateErrorCode.REVOKED if exc.revoked else UpdateErrorCode.FETCH_FAILED
            raise UpdateFailed(code, str(exc)) from exc
        except SignatureError as exc:
            self.store.discard_staging(sha)
            raise UpdateFailed(UpdateErrorCode.BAD_SIGNATURE, str(exc)) from exc
        except BundleError as exc:
            self.store.discard_staging(sha)
            raise UpdateFailed(UpdateErrorCode.HASH_MISMATCH, str(exc)) from exc

    def _verify_staging(self, sha: str) -> None:
        try:
            bundle = self.loader.verify(self.store.staging(sha))
        except LoadFailure:
            self.store.discard_staging(sha)  # a wrong file is not worth resuming
            raise
        if bundle.manifest_sha256 != sha:
            self.store.discard_staging(sha)
            raise UpdateFailed(
                UpdateErrorCode.HASH_MISMATCH, "manifest does not match the desired sha256"
            )


def _size(path: Path) -> int:
    part = path.with_name(path.name + ".part")
    if path.is_file():
        return path.stat().st_size
    return part.stat().st_size if part.is_file() else 0
