"""`cellwatch-hub nodes` and `stats`: what the hub knows of the fleet."""

from __future__ import annotations

import click

from cellwatch.hub import render
from cellwatch.hub.cli.operator import (
    connection,
    emit,
    operator,
)
from cellwatch.hub.client import HubClient
from cellwatch.shared.cli import friendly_errors


@click.command()
@connection
@friendly_errors
@operator
def nodes(client: HubClient, as_json: bool) -> None:
    """List the nodes the hub has seen, what they run and bytes fetched."""
    reply = client.nodes()
    emit(as_json, reply, render.nodes_table(reply.nodes, reply.sites))


@click.command()
@connection
@friendly_errors
@operator
def stats(client: HubClient, as_json: bool) -> None:
    """Bundle bytes served per node and bundle (kept across hub restarts)."""
    reply = client.stats()
    emit(as_json, reply, render.stats_view(reply))
