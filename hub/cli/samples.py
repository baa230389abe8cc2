"""`cellwatch-hub samples list | export | import`: field samples for labelling (the round trip
itself is hub/samplecli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cellwatch.hub import render, samplecli
from cellwatch.hub.cli.operator import (
    connection,
    emit,
    operator,
)
from cellwatch.hub.client import HubClient
from cellwatch.hub.queries import as_json as json_text
from cellwatch.shared.cli import friendly_errors
from cellwatch.shared.samples import SAMPLES_CSV, SampleReason


@click.group()
def samples() -> None:
    """Field samples the nodes sent for labelling: list, export, import (README: Field
    samples)."""


@samples.command("list")
@click.option("--reason", type=click.Choice([r.value for r in SampleReason]), help="only these")
@click.option("--source", help="only the samples of this source (lab account)")
@connection
@friendly_errors
@operator
def samples_list(client: HubClient, reason: str | None, source: str | None, as_json: bool) -> None:
    """The field samples the hub stores, oldest first, with their labels."""
    reply = client.samples(reason, source)
    emit(as_json, reply, render.samples_table(reply))


@samples.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@connection
@friendly_errors
@operator
def samples_export(client: HubClient, directory: Path, as_json: bool) -> None:
    """Write every sample into DIRECTORY for labelling: <id>.png, samples.csv (fill in its
    label column) and label-studio.json / label-studio.xml (tasks with the node's answer as
    a pre-annotation, and a labelling config)."""
    done = samplecli.export(client, directory)
    data = {"directory": str(done.directory), "samples": done.samples}
    _say(
        as_json,
        data,
        f"exported {done.samples} samples to {done.directory}: {SAMPLES_CSV} (label column "
        f"empty until labelled), {samplecli.LABEL_STUDIO_TASKS}, {samplecli.LABEL_STUDIO_CONFIG}",
    )


@samples.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@connection
@friendly_errors
@operator
def samples_import(client: HubClient, file: Path, as_json: bool) -> None:
    """Record the labels of FILE: the filled samples.csv of an export, or Label Studio's
    JSON export. Every problem (an unknown or missing label, an id twice, a sample the hub
    does not have) is one line, then their count; nothing is imported then (exit 2)."""
    try:
        labels = samplecli.read_labels(file, client.samples())
    except samplecli.ImportProblems as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        raise
    reply = client.sample_labels(labels)
    _say(as_json, reply.model_dump(mode="json"), f"imported {reply.labelled} labels from {file}")


def _say(as_json: bool, data: dict[str, Any], line: str) -> None:
    """One line as it is (a path in it is never wrapped), or JSON."""
    click.echo(json_text(data) if as_json else line)
