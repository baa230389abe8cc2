"""Helpers every cellwatch CLI uses: logging set-up and turning errors into one line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click

from cellwatch.shared.errors import CellwatchError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_USER_ERROR = 2


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a CellwatchError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CellwatchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
