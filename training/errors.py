"""The training package's exceptions (one tree under CellwatchError).

`cellwatch-train` turns every TrainingError into one line on stderr and exit code 2
(3 for GateError and QualityError): they describe a user's mistake (bad data folder, wrong
checkpoint, existing output) or a check that failed, never a bug.
"""

from __future__ import annotations

from cellwatch.shared.errors import CellwatchError


class TrainingError(CellwatchError):
    """Base class of every error the training package raises on purpose."""


class DataError(TrainingError):
    """The image folder or split cannot be used (empty, one class, unknown names, too small)."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable, or does not match the network."""


class RunError(TrainingError):
    """A run directory is missing, incomplete, or would be overwritten."""


class ExportError(TrainingError):
    """Freezing, converting, quantising or writing a bundle failed."""


class GateError(ExportError):
    """The deployed model fails the export gate (gate.py) and --allow-degraded was not given.

    `cellwatch-train export` exits with code 3 for it, so scripts can tell a model that
    is not good enough to ship from a mistake."""

    exit_code = 3


class QualityError(GateError):
    """The model shows no evidence of skill (quality.py) and --allow-no-skill was not
    given. Exit code 3, like a failed fidelity gate: the model is not fit to ship."""


class BaseError(ExportError):
    """The run's base checkpoint is not the published TF-Slim file (its SHA-256 is
    unknown) and no --base-is says what it is (base.py)."""
