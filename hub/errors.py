"""The hub's exception tree (under CellwatchError, so CLIs print one line)."""

from __future__ import annotations

from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import CellwatchError


class HubError(CellwatchError):
    """Base of every error the hub and its operator client raise on purpose."""


class HubUnavailable(HubError):
    """The hub did not answer (not running, or not connected to this broker)."""


class HubRefused(HubError):
    """The broker refused our request (the ACL lets only the operator call the hub)."""


class ApiFailure(HubError):
    """An API call failed with an error code (shared.codes.ApiErrorCode); the hub
    answers it, the client raises it."""

    def __init__(self, code: ApiErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


class StoreError(HubError):
    """The bundle store cannot do what was asked (missing bundle, bad file, I/O)."""


class RolloutError(ApiFailure):
    """A rollout verb does not apply in the rollout's current state (a conflict)."""

    def __init__(self, message: str) -> None:
        super().__init__(ApiErrorCode.CONFLICT, message)
