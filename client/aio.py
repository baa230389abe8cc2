"""`AsyncClient`: the asyncio face of the lab client.

The same Core as `Client`: file reads and publishes run in a worker thread
(`asyncio.to_thread`), the Core's futures are awaited with `asyncio.wrap_future`,
and classify_many runs the Core's own window loop in a worker thread, so no logic is
copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from cellwatch.client.answer import Answer
from cellwatch.client.config import ClientSettings
from cellwatch.client.core import Core, Image, Prepared
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
        """As Client.classify_many, as an async iterator: the same Core.many runs in a
        worker thread and hands each Answer to the event loop."""
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[Answer | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            many = self._core.many(
                images, source=source, concurrency=concurrency, timeout=timeout, node=node
            )
            try:
                for answer in many:
                    loop.call_soon_threadsafe(answers.put_nowait, answer)
                    if stop.is_set():
                        break  # closing the generator cancels what is still in flight
            except BaseException as exc:  # raised by the caller's await below
                loop.call_soon_threadsafe(answers.put_nowait, exc)
            finally:
                many.close()
                loop.call_soon_threadsafe(answers.put_nowait, None)

        worker = loop.run_in_executor(None, produce)
        try:
            while (item := await answers.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.shield(worker)

    def stats(self) -> RpcStats:
        return self._core.stats()
