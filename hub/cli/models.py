"""`cellwatch-hub push`, `models` and `models revoke`: the bundles in the registry."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from cellwatch.hub import render
from cellwatch.hub.cli.operator import (
    connection,
    emit,
    operator,
)
from cellwatch.hub.client import HubClient
from cellwatch.shared.cli import friendly_errors


@click.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@connection
@friendly_errors
@operator
def push(client: HubClient, bundle: Path, as_json: bool) -> None:
    """Upload a bundle (directory or .tar); the hub verifies it before storing it."""
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=as_json or not sys.stderr.isatty(),
    )
    with progress:
        task = progress.add_task(f"push {bundle.name}", total=None)
        result = client.push(
            bundle, lambda done, total: progress.update(task, completed=done, total=total)
        )
    m = result.model
    if as_json:
        emit(True, {"status": result.status, "bytes_sent": result.bytes_sent, "model": m}, "")
    elif result.status == "already_present":
        click.echo(
            f"{m['name']} {m['version']} ({m['manifest_sha256'][:12]}) is already on the hub: "
            "nothing to do"
        )
    else:
        click.echo(
            f"stored {m['name']} {m['version']} ({m['manifest_sha256'][:12]}, "
            f"{result.bytes_sent} bytes sent, signer {m['signer'] or 'UNSIGNED'})"
        )


@click.group(invoke_without_command=True)
@click.option("--name", help="only this model")
@connection
@click.pass_context
@friendly_errors
def models(ctx: click.Context, /, name: str | None, as_json: bool, **opts: Any) -> None:
    """List the models stored on the hub; `models revoke` revokes one."""
    if ctx.invoked_subcommand is not None:
        # Only what was typed here: --config may come from CELLWATCH_HUB_CLIENT_CONFIG,
        # which the subcommand reads as well.
        typed = [
            p
            for p in ("name", "as_json", *opts)
            if ctx.get_parameter_source(p) is ParameterSource.COMMANDLINE
        ]
        if typed:
            raise click.UsageError("give the options after the subcommand")
        return
    _list_models(name=name, as_json=as_json, **opts)


@operator
def _list_models(client: HubClient, name: str | None, as_json: bool) -> None:
    reply = client.models(name)
    emit(as_json, reply, render.models_table(reply.models))


@models.command("revoke")
@click.argument("name")
@click.argument("version")
@click.option("--reason", required=True, help="why (shown to operators and in node logs)")
@click.option(
    "--sign-key",
    required=True,
    type=click.Path(path_type=Path),
    envvar="CELLWATCH_SIGN_KEY",
    help="release key (NAME.key) that signs the revocation; its .pub must be among the "
    "hub's and nodes' trusted keys [env CELLWATCH_SIGN_KEY]",
)
@click.option("--request-id", help="idempotency key: the same id never revokes twice")
@connection
@friendly_errors
@operator
def models_revoke(
    client: HubClient,
    name: str,
    version: str,
    reason: str,
    sign_key: Path,
    request_id: str | None,
    as_json: bool,
) -> None:
    """Revoke model NAME VERSION for good: it is never rolled out again, its active
    rollouts are aborted, every node whose desired model names it is sent back to the
    model it ran before, and every node serving it moves to its previous good bundle
    (or answers no_model if it has none). The revocation is signed with a release key,
    as bundles are: nodes take no other, and never forget one."""
    reply = client.revoke(name, version, reason, sign_key, request_id=request_id)
    emit(as_json, reply, render.revoke_view(reply))
