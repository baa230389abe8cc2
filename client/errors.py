"""The lab client's one exception tree (httpx style): catch ClientError for all.

Error Results are answers, not exceptions: `Answer.raise_for_status()` turns one
into a ResultError when the caller wants that.
"""

from __future__ import annotations

from typing import ClassVar

from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.schemas import Result


class ClientError(CellwatchError):
    """Base of every error the lab client raises."""

    code: ClassVar[str] = "client_error"
    """Short machine-readable name (the CLI's JSON and summary show it)."""


class Timeout(ClientError, TimeoutError):
    """No Result within `timeout_s` (after every retry) while the broker was reachable."""

    code = "timeout"

    def __init__(self, message: str, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


class NotAuthorized(ClientError):
    """The broker refused the login or the publish (user, password or ACL)."""

    code = "not_authorized"


class BrokerUnavailable(ClientError):
    """The broker cannot be reached, or the connection was lost and did not come back
    within the request's timeout."""

    code = "broker_unavailable"


class PayloadTooLarge(ClientError):
    """The image does not fit in the broker's Maximum Packet Size (never sent)."""

    code = "payload_too_large"


class InputError(ClientError):
    """An input cannot be read (a path that does not exist, a directory, no permission)."""

    code = "unreadable_input"


class ResultError(ClientError):
    """An error Result, raised by `Answer.raise_for_status()`."""

    code = "error_result"

    def __init__(self, result: Result) -> None:
        err = result.error
        what = f"{err.code.value}: {err.message}" if err is not None else "error"
        super().__init__(f"image {result.image_id} on {result.node_id}: {what}")
        self.result = result
