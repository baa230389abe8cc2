"""cellwatch's lab client: send images, get every Result back.

    from pathlib import Path
    from cellwatch.client import Client

    with Client(config=Path("client.toml")) as client:
        for answer in client.classify_many(Path("smears").glob("*.tif")):
            print(answer.input, answer.status, answer.result and answer.result.label)

`Client` blocks; `AsyncClient` is the same for asyncio. Each image is published
with fresh Correlation Data and a Response Topic under
`cellwatch/replies/{username}/{token}` (a persistent session, so Results sent
while the client reconnects arrive), re-sent after `retry_after_s` (same image_id,
user property `attempt`), with Message Expiry set to the time left, until
`max_attempts` or `timeout_s`; the first Result wins. Error Results are answers:
`Answer.raise_for_status()` raises them. Research use only, not a diagnosis.
"""

from cellwatch.client.aio import AsyncClient
from cellwatch.client.answer import Answer
from cellwatch.client.config import ClientSettings
from cellwatch.client.errors import (
    BrokerUnavailable,
    ClientError,
    InputError,
    NotAuthorized,
    PayloadTooLarge,
    ResultError,
    Timeout,
)
from cellwatch.client.sync import Client
from cellwatch.shared.schemas import Result

__all__ = [
    "Answer",
    "AsyncClient",
    "BrokerUnavailable",
    "Client",
    "ClientError",
    "ClientSettings",
    "InputError",
    "NotAuthorized",
    "PayloadTooLarge",
    "Result",
    "ResultError",
    "Timeout",
]
