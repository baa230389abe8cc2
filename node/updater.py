"""The node's update agent: reconciles the retained `desired` model (DESIGN.md, Rollout).

On a new DesiredModel it reports each state in an UpdateReport: `pending`, then
`downloading` (manifest and signature first, the signature checked before any
large file is fetched; then the files in resumable chunks), `verifying` (every
hash and the signature again, on the complete bundle), `activating` (compile on
this node's device and run the golden self-test), `active` once the service
serves it. A bundle already in the store (the last few activated ones) is
activated without a download, which is what makes a rollback fast. Any failure
reports `failed` with a code and leaves the old model serving.

Work runs on the agent's own thread; the network thread only hands over messages.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import openvino as ov
import paho.mqtt.client as paho
from pydantic import ValidationError

from cellwatch.node.engine import EngineConfig, ServingModel, load_serving_model
from cellwatch.node.errors import ModelLoadError, SelfTestError
from cellwatch.node.fetcher import FetchCancelled, Fetcher, FetchError
from cellwatch.node.store import BundleStore
from cellwatch.shared.bundle import load_bundle, parse_manifest, verify_signature
from cellwatch.shared.errors import BundleError, SignatureError
from cellwatch.shared.limits import MAX_MANIFEST_BYTES
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.schemas import (
    ApiError,
    DesiredModel,
    UpdateReport,
    UpdateState,
    utcnow,
)
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

DISK_MARGIN_BYTES = 16 * 1024 * 1024


class UpdateFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UpdateAgent:
    def __init__(
        self,
        *,
        mqtt: MqttClient,
        topics: Topics,
        node_id: str,
        store: BundleStore,
        fetcher: Fetcher,
        trusted: TrustedKeys,
        allow_unsigned: bool,
        core: ov.Core,
        engine: EngineConfig,
        self_test: bool,
        current_sha: Callable[[], str | None],
        activate: Callable[[ServingModel], None],
    ) -> None:
        self.mqtt = mqtt
        self.topics = topics
        self.node_id = node_id
        self.store = store
        self.fetcher = fetcher
        self.trusted = trusted
        self.allow_unsigned = allow_unsigned
        self.core = core
        self.engine = engine
        self.self_test = self_test
        self._current_sha = current_sha
        self._activate = activate
        self._cond = threading.Condition()
        self._desired: DesiredModel | None = None
        self._in_progress: DesiredModel | None = None
        self._generation = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"{node_id}-updater", daemon=True)
        self.last_report: UpdateReport | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        self.fetcher.close()

    # -- network thread --------------------------------------------------------------
    def on_desired(self, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return  # retained desired cleared
        try:
            desired = DesiredModel.model_validate_json(msg.payload)
        except ValidationError as exc:
            log.error(
                "node %s: ignoring malformed desired model: %s",
                self.node_id,
                exc.errors()[0]["msg"],
            )
            return
        with self._cond:
            if desired == self._in_progress:
                return  # the broker resent the retained desired on reconnect: keep going
            self._desired = desired
            self._generation += 1
            self._cond.notify_all()

    # -- agent thread ------------------------------------------------------------------
    def _run(self) -> None:
        seen = 0
        while True:
            with self._cond:
                while not self._stop and self._generation == seen:
                    self._cond.wait()
                if self._stop:
                    return
                seen = self._generation
                desired = self._desired
                self._in_progress = desired
            if desired is not None:
                try:
                    self._reconcile(desired, seen)
                finally:
                    with self._cond:
                        self._in_progress = None

    def _superseded(self, generation: int) -> bool:
        with self._cond:
            return self._stop or self._generation != generation

    def _report(
        self, d: DesiredModel, state: UpdateState, progress: float, error: ApiError | None = None
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
        self.mqtt.publish(self.topics.update(self.node_id), report.to_json(), qos=1)

    def _reconcile(self, d: DesiredModel, generation: int) -> None:
        sha = d.model.manifest_sha256
        rid = d.rollout_id
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
            if not self.store.has(sha):
                self._download(d, generation)
                self._report(d, UpdateState.VERIFYING, 1.0)
                self._verify_staging(sha)
                self.store.promote(sha)
            else:
                log.info(
                    "node %s: rollout %s: %s is in the store, no download needed",
                    self.node_id,
                    rid,
                    sha[:12],
                )
                self._report(d, UpdateState.VERIFYING, 1.0)
            self._report(d, UpdateState.ACTIVATING, 1.0)
            model = self._compile(sha)
            if self._superseded(generation):
                return
            self._activate(model)
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
            log.error(
                "node %s: rollout %s: update failed (%s): %s", self.node_id, rid, exc.code, exc
            )
            self._report(d, UpdateState.FAILED, 0.0, ApiError(code=exc.code, message=str(exc)))

    def _download(self, d: DesiredModel, generation: int) -> None:
        sha = d.model.manifest_sha256
        staging = self.store.staging(sha)

        def cancelled() -> bool:
            return self._superseded(generation)

        try:
            for name in (MANIFEST_FILE, SIGNATURE_FILE):
                if not (staging / name).is_file():
                    self.fetcher.fetch(
                        sha, name, staging / name, max_size=MAX_MANIFEST_BYTES, cancelled=cancelled
                    )
            manifest_bytes = (staging / MANIFEST_FILE).read_bytes()
            self._check_signature(manifest_bytes, (staging / SIGNATURE_FILE).read_bytes())
            manifest = parse_manifest(manifest_bytes)
            total = sum(e.size for e in manifest.files.values())
            have = sum(_size(staging / n) for n in manifest.files)
            if self.store.free_bytes() < total - have + DISK_MARGIN_BYTES:
                raise UpdateFailed("disk_full", f"need {total - have} bytes in {self.store.root}")
            reported = [0.0]

            def progress(done: int, size: int) -> None:
                frac = (have_done[0] + done) / max(total, 1)
                if frac - reported[0] >= 0.1:
                    reported[0] = frac
                    self._report(d, UpdateState.DOWNLOADING, frac)

            have_done = [0]
            self._report(d, UpdateState.DOWNLOADING, 0.0)
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
            raise UpdateFailed("fetch_failed", str(exc)) from exc
        except SignatureError as exc:
            self.store.discard_staging(sha)
            raise UpdateFailed("bad_signature", str(exc)) from exc
        except BundleError as exc:
            self.store.discard_staging(sha)
            raise UpdateFailed("hash_mismatch", str(exc)) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UpdateFailed("disk_full", str(exc)) from exc
            raise UpdateFailed("internal", f"download failed: {exc}") from exc

    def _check_signature(self, manifest: bytes, signature: bytes) -> None:
        verify_signature(manifest, signature, self.trusted, allow_unsigned=self.allow_unsigned)

    def _verify_staging(self, sha: str) -> None:
        staging = self.store.staging(sha)
        try:
            bundle = load_bundle(staging, self.trusted, allow_unsigned=self.allow_unsigned)
        except SignatureError as exc:
            self.store.discard_staging(sha)
            raise UpdateFailed("bad_signature", str(exc)) from exc
        except BundleError as exc:
            self.store.discard_staging(sha)  # a wrong file is not worth resuming
            raise UpdateFailed("hash_mismatch", str(exc)) from exc
        if bundle.manifest_sha256 != sha:
            self.store.discard_staging(sha)
            raise UpdateFailed("hash_mismatch", "manifest does not match the desired sha256")

    def _compile(self, sha: str) -> ServingModel:
        try:
            bundle = load_bundle(
                self.store.path(sha), self.trusted, allow_unsigned=self.allow_unsigned
            )
        except SignatureError as exc:
            raise UpdateFailed("bad_signature", str(exc)) from exc
        except BundleError as exc:
            raise UpdateFailed("hash_mismatch", str(exc)) from exc
        try:
            return load_serving_model(self.core, bundle, self.engine, self_test=self.self_test)
        except SelfTestError as exc:
            raise UpdateFailed("self_test_failed", str(exc)) from exc
        except ModelLoadError as exc:
            raise UpdateFailed("compile_error", str(exc)) from exc


def _size(path: Path) -> int:
    part = path.with_name(path.name + ".part")
    if path.is_file():
        return path.stat().st_size
    return part.stat().st_size if part.is_file() else 0
