"""`AsyncClient`: the asyncio face of the lab client.

The same Core as `Client`; file reads and publishes run in a worker thread
(`asyncio.to_thread`), and the Core's futures are awaited with
`asyncio.wrap_future`, so no logic is copied.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from cellwatch.client.answer import Answer
from cellwatch.client.config import ClientSettings
from cellwatch.client.core import Core, Image, Prepared
from cellwatch.client.errors import ClientError
from cellwatch.client.sync import load_settings
from cellwatch.shared.rpc import Reply, RpcStats
from cellwatch.shared.schemas import Result

Sent = tuple[Prepared, Future[Reply[Result]]]


class AsyncClient:
    """async with AsyncClient(config=Path("client.toml")) as client:
    answer = await client.classify(Path("smear.tif"))"""

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        config: Path | None = None,
        **overrides: Any,
    ) -> None:
        self._core = Core(load_settings(settings, config, overrides))

    @property
    def settings(self) -> ClientSettings:
        return self._core.settings

    async def connect(self) -> None:
        await asyncio.to_thread(self._core.connect)

    async def close(self) -> None:
        await asyncio.to_thread(self._core.close)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _send(
        self,
        image: Image,
        index: int,
        source: str | None,
        image_id: str | None,
        timeout: float | None,
        node: str | None = None,
    ) -> Sent:
        p = self._core.prepare(image, index=index, source=source, image_id=image_id, node=node)
        return p, self._core.submit(p, timeout)

    async def _answer(self, sent: Sent) -> Answer:
        p, future = sent
        with contextlib.suppress(Exception):  # the Core turns it into the Answer's error
            await asyncio.wrap_future(future)
        return self._core.answer(p, future)

    async def classify(
        self,
        image: Image,
        *,
        source: str | None = None,
        image_id: str | None = None,
        timeout: float | None = None,
        node: str | None = None,
    ) -> Answer:
        """As Client.classify."""
        sent = await asyncio.to_thread(self._send, image, 0, source, image_id, timeout, node)
        answer = await self._answer(sent)
        if answer.error is not None:
            raise answer.error
        return answer

    async def classify_many(
        self,
        images: Iterable[Image],
        *,
        source: str | None = None,
        concurrency: int | None = None,
        timeout: float | None = None,
        node: str | None = None,
    ) -> AsyncIterator[Answer]:
        """As Client.classify_many, as an async iterator."""
        limit = concurrency or self._core.settings.concurrency
        if limit < 1:
            raise ValueError("concurrency must be >= 1")
        pending: set[asyncio.Task[Answer]] = set()
        inputs = enumerate(images)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < limit:
                    item = next(inputs, None)
                    if item is None:
                        exhausted = True
                        break
                    index, image = item
                    try:
                        sent = await asyncio.to_thread(
                            self._send, image, index, source, None, timeout, node
                        )
                    except ClientError as exc:
                        name = f"bytes#{index}" if isinstance(image, bytes) else str(image)
                        yield Answer(name, "", error=exc)
                        continue
                    pending.add(asyncio.create_task(self._answer(sent)))
                if not pending:
                    return
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()

    def stats(self) -> RpcStats:
        return self._core.stats()
