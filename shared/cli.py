"""Helpers every cellwatch CLI uses: logging set-up, turning errors into one line, and the
options of a command that connects to the broker."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any, ParamSpec, Protocol, TypeVar

import click

from cellwatch.shared.errors import CellwatchError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_INTERRUPTED = 130
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    level: str = "INFO", *, handler: logging.Handler | None = None, quiet: Iterable[str] = ()
) -> None:
    """Log one line per event to stderr (daemons: with time, level and logger).

    `handler` replaces that (and any handler set before): the training CLI passes its
    rich handler, which prints the message alone next to its progress bars. `quiet`
    loggers (other libraries') only show warnings."""
    if handler is None:
        logging.basicConfig(
            level=getattr(logging, level.upper(), logging.INFO),
            format=LOG_FORMAT,
            stream=sys.stderr,
        )
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(
            level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True
        )
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a CellwatchError into `error: ...` on stderr and its exit code (2 unless the
    error class says otherwise, e.g. a failed export gate exits 3); Ctrl-C into
    `interrupted` and 130. Anything else is a bug: its traceback is shown."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CellwatchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


class Service(Protocol):
    """What node and hub daemons offer their CLI (one stop event, ordered shutdown)."""

    exit_code: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def join(self) -> None: ...
    def abort(self) -> None: ...


def run_until_signalled(service: Service) -> None:
    """Start service, wait for SIGTERM/SIGINT (or the service stopping itself), then
    shut it down in order and exit with the service's exit code.

    A start that fails (e.g. the broker refused us) releases what it opened first.
    """

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        service.start()
    except BaseException:
        service.abort()
        raise
    service.wait()
    service.join()
    # Shut down: a repeated signal (systemd, an impatient Ctrl-C) must not turn the
    # clean exit into a kill while the interpreter finalises.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if service.exit_code:
        sys.exit(service.exit_code)


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def broker_options(
    *, config_dest: str, envvar: str, config_help: str, user: str
) -> list[Decorator]:
    """The options a command that connects to the broker takes: --config FILE (its
    settings file, `envvar` by default), --host, --port, --user (default `user`),
    --password-file, --tls-ca. `mqtt_overrides` turns what was given into settings."""
    return [
        click.option(
            "--config",
            config_dest,
            type=click.Path(path_type=Path),
            envvar=envvar,
            help=config_help,
        ),
        click.option("--host", help="broker host"),
        click.option("--port", type=int, help="broker port"),
        click.option("--user", help=f"MQTT user (default: {user})"),
        click.option(
            "--password-file", type=click.Path(path_type=Path), help="file holding the password"
        ),
        click.option(
            "--tls-ca", type=click.Path(path_type=Path), help="CA certificate: connect with TLS"
        ),
    ]


def mqtt_overrides(opts: dict[str, Any]) -> dict[str, Any]:
    """The settings overrides ({"mqtt": {...}} or none) of the broker options given."""
    mqtt: dict[str, Any] = {}
    for key, name in (("host", "host"), ("port", "port"), ("user", "username")):
        if opts.get(key) is not None:
            mqtt[name] = opts[key]
    if opts.get("password_file") is not None:
        mqtt["password_file"] = opts["password_file"]
    if opts.get("tls_ca") is not None:
        mqtt["tls"] = {"enabled": True, "ca_file": opts["tls_ca"]}
    return {"mqtt": mqtt} if mqtt else {}
