"""Turning a bundle on disk into a model the node serves, and choosing which one.

`BundleLoader.load` verifies a bundle (every file's hash, the signature), compiles it
on the node's device and runs its self-test. Whatever goes wrong, OpenVINO's own
exceptions included, comes out as one `LoadFailure` with a ModelErrorCode
(shared/schemas.py), never as anything else. `first_good` walks a list of bundles
(the active one, then earlier ones) and serves the first that loads and is not
revoked: the start-up fallback and the move off a revoked bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import openvino as ov

from cellwatch.node.engine import EngineConfig, ServingModel, load_serving_model
from cellwatch.node.errors import ModelLoadError, NodeError, SelfTestError
from cellwatch.node.faults import NO_FAULTS, FaultPoint, Faults
from cellwatch.shared.bundle import Bundle, load_bundle
from cellwatch.shared.codes import ModelErrorCode
from cellwatch.shared.errors import BundleError, SignatureError
from cellwatch.shared.schemas import ModelError
from cellwatch.shared.signing import TrustedKeys

log = logging.getLogger(__name__)


class LoadFailure(NodeError):
    """A bundle cannot be served; `code` says why."""

    def __init__(self, code: ModelErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def error(self) -> ModelError:
        return ModelError(code=self.code, message=str(self)[:2048])


@dataclass(frozen=True)
class Candidate:
    """A bundle the node could serve: its directory and, if known, its sha256."""

    path: Path
    sha: str | None = None

    def label(self) -> str:
        return self.sha[:12] if self.sha else str(self.path)


class BundleLoader:
    def __init__(
        self,
        core: ov.Core,
        trusted: TrustedKeys,
        engine: EngineConfig,
        *,
        allow_unsigned: bool,
        self_test: bool,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self.core = core
        self.trusted = trusted
        self.engine = engine
        self.allow_unsigned = allow_unsigned
        self.self_test = self_test
        self.faults = faults

    def verify(self, path: Path) -> Bundle:
        """The verified bundle at path; LoadFailure (bad_signature, hash_mismatch)."""
        try:
            return load_bundle(path, self.trusted, allow_unsigned=self.allow_unsigned)
        except SignatureError as exc:
            raise LoadFailure(ModelErrorCode.BAD_SIGNATURE, f"{path.name}: {exc}") from exc
        except BundleError as exc:
            raise LoadFailure(ModelErrorCode.HASH_MISMATCH, f"{path.name}: {exc}") from exc
        except OSError as exc:
            raise LoadFailure(ModelErrorCode.HASH_MISMATCH, f"cannot read {path}: {exc}") from exc

    def compile(self, bundle: Bundle, engine: EngineConfig | None = None) -> ServingModel:
        """Compile and self-test a verified bundle (engine: the node's unless given);
        LoadFailure (compile_error, self_test_failed) whatever OpenVINO raises."""
        try:
            self.faults.at(FaultPoint.COMPILE)
            return load_serving_model(
                self.core, bundle, engine or self.engine, self_test=self.self_test
            )
        except SelfTestError as exc:
            raise LoadFailure(ModelErrorCode.SELF_TEST_FAILED, str(exc)) from exc
        except ModelLoadError as exc:
            raise LoadFailure(ModelErrorCode.COMPILE_ERROR, str(exc)) from exc
        except Exception as exc:  # OpenVINO raises RuntimeError and others of its own
            raise LoadFailure(
                ModelErrorCode.COMPILE_ERROR, f"OpenVINO failed on {bundle}: {exc}"
            ) from exc

    def load(self, path: Path) -> ServingModel:
        return self.compile(self.verify(path))

    def first_good(
        self, candidates: Sequence[Candidate], revoked: frozenset[str]
    ) -> tuple[ServingModel | None, Candidate | None, list[tuple[Candidate, LoadFailure]]]:
        """(model, its candidate, the failures before it) for the first candidate that
        is not revoked and loads; (None, None, failures) if none does."""
        failures: list[tuple[Candidate, LoadFailure]] = []
        for c in candidates:
            if c.sha is not None and c.sha in revoked:
                failures.append((c, LoadFailure(ModelErrorCode.REVOKED, f"{c.label()} is revoked")))
                continue
            try:
                model = self.load(c.path)
            except LoadFailure as exc:
                log.error("bundle %s cannot be served (%s): %s", c.label(), exc.code, exc)
                failures.append((c, exc))
                continue
            if model.bundle.manifest_sha256 in revoked:
                failures.append(
                    (c, LoadFailure(ModelErrorCode.REVOKED, f"{model.bundle} is revoked"))
                )
                continue
            return model, c, failures
        return None, None, failures
