"""How an operator command reaches the hub: the connection options every command takes,
the connected client it is given, and how it prints (a rich view, or JSON for scripts)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click
from pydantic import BaseModel
from rich.console import Console, RenderableType

from cellwatch.hub.client import HubClient
from cellwatch.hub.config import OperatorSettings
from cellwatch.hub.queries import as_json as json_text
from cellwatch.shared.cli import broker_options, mqtt_overrides, setup_logging
from cellwatch.shared.promotion import (
    ShadowSpecError,
)

P = ParamSpec("P")
R = TypeVar("R")
CONNECTION_HELP = """
Operator commands connect to the broker from, in rising precedence: --config FILE
(an [mqtt] section as in hub.toml; default $CELLWATCH_HUB_CLIENT_CONFIG), the
CELLWATCH_MQTT__HOST / __PORT / __USERNAME / __PASSWORD_FILE environment variables,
and each command's --host/--port/--user/--password-file/--tls-ca options. The user
defaults to `operator`, the only role the broker lets call the hub API. Errors are
one line on stderr and exit code 2.
"""


def console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def connection(func: Callable[P, R]) -> Callable[P, R]:
    """The options every operator command takes (see CONNECTION_HELP)."""
    options = [
        *broker_options(
            config_dest="client_config",
            envvar="CELLWATCH_HUB_CLIENT_CONFIG",
            config_help="operator TOML file with an [mqtt] section",
            user="operator",
        ),
        click.option("--timeout", type=float, help="seconds to wait for the hub (default 10)"),
        click.option("--json", "as_json", is_flag=True, help="print JSON for scripts"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(opts: dict[str, Any]) -> HubClient:
    overrides = mqtt_overrides(opts)
    if opts.get("timeout") is not None:
        overrides["timeout_s"] = opts["timeout"]
    settings = OperatorSettings.load(opts.get("client_config"), **overrides)
    client = HubClient(settings.mqtt, timeout_s=settings.timeout_s)
    client.connect()
    return client


def operator(func: Callable[..., None]) -> Callable[..., None]:
    """Connect with the connection options, pass the client, disconnect after."""

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> None:
        opts = {
            k: kwargs.pop(k)
            for k in ("client_config", "host", "port", "user", "password_file", "tls_ca", "timeout")
        }
        setup_logging("CRITICAL")  # errors reach the user as one line, not as logs
        client = _client(opts)
        try:
            func(client, **kwargs)
        finally:
            client.close()

    return wrapper


def checked(
    parse: Callable[[str], object],
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: the value as typed, once `parse` accepts it (a usage error,
    before any connection, otherwise)."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            try:
                parse(value)
            except ShadowSpecError as exc:
                raise click.BadParameter(str(exc)) from exc
        return value

    return check


def emit(as_json: bool, data: BaseModel | dict[str, Any], view: RenderableType) -> None:
    if as_json:
        click.echo(json_text(data))
    else:
        console().print(view)
