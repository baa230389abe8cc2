"""Progress bars for long work (rich, on stderr, only when stderr is a terminal).

Library code wraps long loops in `track(...)`; in tests, pipes and CI logs the bars
are off and only log lines appear.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield items while showing a progress bar (no bar when stderr is not a terminal)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


NOISY_LOGGERS = ("tensorflow", "nncf", "matplotlib", "PIL", "h5py")


def log_handler() -> logging.Handler:
    """The training CLI's log handler: stderr through rich, beside the progress bars."""
    return RichHandler(console=console, show_path=False, show_time=False, markup=False)
