"""The request layer's errors (under CellwatchError)."""

from __future__ import annotations

from cellwatch.shared.errors import CellwatchError


class RpcError(CellwatchError):
    """A request failed (subclasses say how)."""


class RequestTimeout(RpcError):
    """No answer before the request's deadline."""

    def __init__(self, message: str, *, attempts: int, waited_s: float, connected: bool) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.waited_s = waited_s
        self.connected = connected
        """Whether the connection was up when the deadline passed."""


class PublishRefused(RpcError):
    """The broker refused the request's publish (PUBACK >= 0x80: usually the ACL)."""


class PacketTooLarge(RpcError):
    """The request is larger than the broker's Maximum Packet Size (not sent)."""


class RemoteError(RpcError):
    """The peer answered with an error (raised by a `parse` function)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RpcClosed(RpcError):
    """The Rpc was closed while the request was pending."""
