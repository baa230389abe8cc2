"""`Answer`: what the client returns for one image (the node's Result, or why there
is none), tied to its input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cellwatch.client.errors import ClientError, ResultError
from cellwatch.shared.schemas import Result


@dataclass(frozen=True)
class Answer:
    input: str
    """The file's path, or `bytes#N` for the N-th bytes input."""
    image_id: str
    """The Result's image_id; without a Result, the one sent ("" if the node was to
    derive it from the payload)."""
    result: Result | None = None
    """The first Result that came back (status ok or error), if any."""
    error: ClientError | None = None
    """Why there is no Result (timeout, too large, unreadable, not authorized ...)."""
    attempts: int = 0
    """Publishes made for this image (1 = answered without a retry)."""
    round_trip_s: float | None = None
    """From the first publish to the Result."""

    @property
    def ok(self) -> bool:
        """An `ok` Result came back."""
        return self.result is not None and self.result.status == "ok"

    @property
    def status(self) -> str:
        """`ok`, the error Result's code, or the client error's code."""
        if self.result is not None:
            if self.result.error is not None:
                return self.result.error.code.value
            return self.result.status
        return self.error.code if self.error is not None else "unknown"

    def raise_for_status(self) -> Result:
        """The Result if it is `ok`; ResultError for an error Result; the client error
        (Timeout, PayloadTooLarge, ...) if there is no Result."""
        if self.result is None:
            raise self.error or ClientError(f"{self.input}: no Result")
        if self.result.status != "ok":
            raise ResultError(self.result)
        return self.result

    def to_dict(self) -> dict[str, Any]:
        """One JSON object: the input, attempts, round trip and the Result (or error)."""
        out: dict[str, Any] = {
            "input": self.input,
            "image_id": self.image_id,
            "status": self.status,
            "attempts": self.attempts,
            "round_trip_ms": (
                round(self.round_trip_s * 1000, 1) if self.round_trip_s is not None else None
            ),
        }
        if self.result is not None:
            out["result"] = self.result.model_dump(mode="json", by_alias=True)
        if self.error is not None:
            out["error"] = {"code": self.error.code, "message": str(self.error)}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))
