"""`cellwatch-client`: classify images from the command line, or watch a folder.

Parses arguments, loads settings and calls the library; errors are one line on
stderr. Exit codes: 0 every image got an `ok` Result; 1 some got an error Result
or no Result in time; 2 usage, connection or authorisation errors.
"""

from __future__ import annotations

import csv
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cellwatch.client.answer import Answer
from cellwatch.client.config import ClientSettings
from cellwatch.client.core import Core
from cellwatch.client.errors import BrokerUnavailable, NotAuthorized
from cellwatch.client.inputs import expand
from cellwatch.client.summary import Summary
from cellwatch.client.watch import Watcher
from cellwatch.shared.cli import broker_options, friendly_errors, mqtt_overrides, setup_logging
from cellwatch.shared.errors import CellwatchError

EXIT_OK = 0
EXIT_SOME_FAILED = 1

CONNECTION_HELP = """
Connection and defaults come from, in rising precedence: --config FILE (TOML with an
[mqtt] section and the keys of deploy/client.example.toml; default
$CELLWATCH_CLIENT_CONFIG), CELLWATCH_* environment variables (CELLWATCH_MQTT__HOST,
CELLWATCH_TIMEOUT_S, ...), and the options. The user defaults to `client`. Exit codes:
0 every image got an ok Result, 1 some got an error Result or none in time, 2 usage,
connection or authorisation errors (one line on stderr).
"""

CSV_COLUMNS = (
    "input",
    "image_id",
    "status",
    "label",
    "confidence",
    "low_confidence",
    "node_id",
    "model_version",
    "attempts",
    "round_trip_ms",
    "error",
)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def connection(func: Callable[..., None]) -> Callable[..., None]:
    options = [
        *broker_options(
            config_dest="config",
            envvar="CELLWATCH_CLIENT_CONFIG",
            config_help="client TOML file ([mqtt] section and client settings)",
            user="client",
        ),
        click.option(
            "--source", help="scope (microscope) name: images go to cellwatch/images/USER/SOURCE"
        ),
        click.option("--node", help="send to this node only (its direct topic), not to every node"),
        click.option(
            "--concurrency", type=click.IntRange(1, 1024), help="images in flight at once"
        ),
        click.option(
            "--timeout", type=click.FloatRange(min=0.1), help="seconds per image, retries included"
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_settings(opts: dict[str, Any]) -> ClientSettings:
    overrides = mqtt_overrides(opts)
    for key, name in (
        ("source", "source"),
        ("node", "node"),
        ("concurrency", "concurrency"),
        ("timeout", "timeout_s"),
    ):
        if opts.get(key) is not None:
            overrides[name] = opts[key]
    return ClientSettings.load(opts.get("config"), **overrides)


def connected(settings: ClientSettings) -> Core:
    setup_logging(settings.log_level)
    core = Core(settings)
    core.connect()
    return core


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=CONNECTION_HELP,
)
def main() -> None:
    """cellwatch lab client: send images to the nodes and get every Result back.

    Research use only: a Result is not a diagnosis."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--recursive", "-r", is_flag=True, help="also search the folders' subfolders")
@click.option("--json", "as_json", is_flag=True, help="one JSON line per image on stdout")
@click.option(
    "--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path), help="write a CSV file"
)
@connection
@friendly_errors
def classify(
    paths: tuple[Path, ...], recursive: bool, as_json: bool, csv_file: Path | None, **opts: Any
) -> None:
    """Classify image files (folders: the images in them).

    Prints one line per image as its Result comes (--json: the Answer as JSON), then a
    summary on stderr: counts per label and error code, round trip p50/p99, retries,
    duplicates."""
    if as_json and csv_file is not None:
        raise click.UsageError("--json and --csv exclude each other")
    files = expand(paths, recursive=recursive)
    settings = load_settings(opts)
    core = connected(settings)
    summary = Summary()
    err = _stderr()
    lost_broker: BrokerUnavailable | None = None
    try:
        with _csv_writer(csv_file) as rows, _progress(err, len(files)) as progress:
            task = progress.add_task("classifying", total=len(files))
            for answer in core.many(files):
                if isinstance(answer.error, NotAuthorized):
                    raise answer.error
                if isinstance(answer.error, BrokerUnavailable):
                    lost_broker = answer.error
                summary.add(answer)
                if as_json:
                    click.echo(answer.to_json())
                elif rows is not None:
                    rows.writerow(csv_row(answer))
                else:
                    click.echo(line(answer))  # above the progress bar (rich redirects stdout)
                progress.advance(task)
    finally:
        stats = core.stats()
        core.close()
    for text in summary.lines(stats):
        click.echo(text, err=True)
    if lost_broker is not None:
        raise lost_broker
    sys.exit(EXIT_OK if summary.failed == 0 else EXIT_SOME_FAILED)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="append one JSON line per image here",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    help="state file (default: OUT.state): what was sent and what is done",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    help="seconds between folder scans",
)
@click.option(
    "--settle",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="seconds a file's size and mtime must stay unchanged before it is sent",
)
@connection
@friendly_errors
def watch(
    folder: Path, out: Path, state: Path | None, interval: float, settle: float, **opts: Any
) -> None:
    """Send each new image in FOLDER once it is completely written; append every
    Answer to OUT. A restart neither sends a finished file again nor forgets one that
    was sent but not answered. Ctrl-C stops it."""
    settings = load_settings(opts)
    core = connected(settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    watcher = Watcher(
        core,
        folder,
        out,
        state or out.with_name(out.name + ".state"),
        interval_s=interval,
        settle_s=settle,
        concurrency=settings.concurrency,
        stop=stop,
        on_answer=lambda a: click.echo(line(a), err=True),
    )
    click.echo(f"watching {folder}; answers go to {out} (Ctrl-C stops)", err=True)
    try:
        summary = watcher.run()
    finally:
        in_flight = watcher.in_flight
        stats = core.stats()
        core.close()
    if in_flight:
        click.echo(f"stopped with {in_flight} images unanswered: sent again next time", err=True)
    for text in summary.lines(stats):
        click.echo(text, err=True)


def line(answer: Answer) -> str:
    r = answer.result
    rtt = f"{answer.round_trip_s * 1000:.0f} ms" if answer.round_trip_s is not None else "-"
    if r is not None and r.status == "ok":
        low = " (low confidence)" if r.low_confidence else ""
        return (
            f"{answer.input}  {r.label} {r.confidence or 0:.3f}{low}  {r.node_id}  "
            f"{r.model.version if r.model else '-'}  {rtt}"
        )
    message = (
        r.error.message if r is not None and r.error else str(answer.error) if answer.error else ""
    )
    return f"{answer.input}  {answer.status}: {message}  {rtt}"


def csv_row(answer: Answer) -> dict[str, Any]:
    r = answer.result
    return {
        "input": answer.input,
        "image_id": answer.image_id,
        "status": answer.status,
        "label": r.label if r else None,
        "confidence": r.confidence if r else None,
        "low_confidence": r.low_confidence if r else None,
        "node_id": r.node_id if r else None,
        "model_version": r.model.version if r and r.model else None,
        "attempts": answer.attempts,
        "round_trip_ms": round(answer.round_trip_s * 1000, 1) if answer.round_trip_s else None,
        "error": (
            r.error.message if r and r.error else str(answer.error) if answer.error else None
        ),
    }


class _csv_writer:
    """`with _csv_writer(path) as rows`: a csv.DictWriter, or None without a path."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> csv.DictWriter[str] | None:
        if self.path is None:
            return None
        try:
            self._file = self.path.open("w", newline="")
        except OSError as exc:
            raise CellwatchError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        writer = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        return writer

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _progress(console: Console, total: int) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=total <= 1 or not console.is_terminal,
        transient=True,
    )


if __name__ == "__main__":
    main()
