"""`Client`: the blocking face of the lab client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from cellwatch.client.answer import Answer
from cellwatch.client.config import ClientSettings
from cellwatch.client.core import Core, Image
from cellwatch.shared.rpc import RpcStats


def load_settings(
    settings: ClientSettings | None, config: Path | None, overrides: dict[str, Any]
) -> ClientSettings:
    if settings is not None:
        if config is not None or overrides:
            raise TypeError("give either settings, or config and overrides")
        return settings
    return ClientSettings.load(config, **overrides)


class Client:
    """Send images to the nodes and get their Results back.

        with Client(config=Path("client.toml")) as client:
            answer = client.classify(Path("smear.tif"))
            print(answer.raise_for_status().label)

    `settings`, or a TOML file (`config`) plus keyword overrides, plus `CELLWATCH_*`
    environment variables (ClientSettings). Thread-safe.
    """

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

    @property
    def reply_topic(self) -> str:
        return self._core.reply_topic

    def connect(self) -> None:
        """NotAuthorized (refused login) or BrokerUnavailable (no answer)."""
        self._core.connect()

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def classify(
        self,
        image: Image,
        *,
        source: str | None = None,
        image_id: str | None = None,
        timeout: float | None = None,
        node: str | None = None,
    ) -> Answer:
        """Classify one image; the Answer holds the node's Result (ok or error).
        node: send it to that node's direct topic instead of the shared one.

        Raises Timeout, BrokerUnavailable, NotAuthorized, PayloadTooLarge or
        InputError when there is no Result."""
        core = self._core
        prepared = core.prepare(image, source=source, image_id=image_id, node=node)
        answer = core.answer(prepared, core.submit(prepared, timeout))
        if answer.error is not None:
            raise answer.error
        return answer

    def classify_many(
        self,
        images: Iterable[Image],
        *,
        source: str | None = None,
        concurrency: int | None = None,
        timeout: float | None = None,
        node: str | None = None,
    ) -> Iterator[Answer]:
        """Answers in completion order, each tied to its input (`Answer.input`); at most
        `concurrency` images in flight. Nothing is raised per image: an image without a
        Result has `Answer.error` set."""
        return self._core.many(
            images, source=source, concurrency=concurrency, timeout=timeout, node=node
        )

    def stats(self) -> RpcStats:
        """Counters: sent, retries, duplicates and unknown or malformed Results dropped."""
        return self._core.stats()
