"""`cellwatch-hub`: run the hub (`serve`) and operate it (push, models, nodes,
rollout ...). Parses arguments, loads settings and calls library code; errors
become one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
from click.core import ParameterSource
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from cellwatch.hub import render, samplecli
from cellwatch.hub.client import HubClient
from cellwatch.hub.config import HubSettings, OperatorSettings, RelaySettings
from cellwatch.hub.queries import as_json as json_text
from cellwatch.hub.service import HubService
from cellwatch.shared.cli import friendly_errors, run_until_signalled, setup_logging
from cellwatch.shared.hubapi import RolloutInfo, RolloutStartArgs
from cellwatch.shared.promotion import (
    ShadowSpecError,
    parse_duration,
    parse_promote_when,
    parse_rate,
)
from cellwatch.shared.samples import SAMPLES_CSV, SampleReason
from cellwatch.shared.states import FINISHED_ROLLOUT_STATES, TARGET_FAILURES, RolloutState

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


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def connection(func: Callable[P, R]) -> Callable[P, R]:
    """The options every operator command takes (see CONNECTION_HELP)."""
    options = [
        click.option(
            "--config",
            "client_config",
            type=click.Path(path_type=Path),
            envvar="CELLWATCH_HUB_CLIENT_CONFIG",
            help="operator TOML file with an [mqtt] section",
        ),
        click.option("--host", help="broker host"),
        click.option("--port", type=int, help="broker port"),
        click.option("--user", help="MQTT user (default: operator)"),
        click.option(
            "--password-file", type=click.Path(path_type=Path), help="file holding the password"
        ),
        click.option(
            "--tls-ca", type=click.Path(path_type=Path), help="CA certificate: connect with TLS"
        ),
        click.option("--timeout", type=float, help="seconds to wait for the hub (default 10)"),
        click.option("--json", "as_json", is_flag=True, help="print JSON for scripts"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(opts: dict[str, Any]) -> HubClient:
    mqtt: dict[str, Any] = {}
    for key, field in (("host", "host"), ("port", "port"), ("user", "username")):
        if opts.get(key) is not None:
            mqtt[field] = opts[key]
    if opts.get("password_file") is not None:
        mqtt["password_file"] = opts["password_file"]
    if opts.get("tls_ca") is not None:
        mqtt["tls"] = {"enabled": True, "ca_file": opts["tls_ca"]}
    overrides: dict[str, Any] = {"mqtt": mqtt} if mqtt else {}
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


def _checked(
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
        _console().print(view)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=CONNECTION_HELP,
)
def main() -> None:
    """cellwatch hub: model registry, bundle distribution and staged rollouts.

    Research use only: results are not a diagnosis.
    """


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="hub.toml (CELLWATCH_* environment variables override it)",
)
@friendly_errors
def serve(config_path: Path | None) -> None:
    """Run the hub until SIGTERM/SIGINT."""
    settings = HubSettings.load(config_path)
    setup_logging(settings.log_level)
    run_until_signalled(HubService(settings))


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="relay.toml (CELLWATCH_* environment variables override it)",
)
@friendly_errors
def relay(config_path: Path | None) -> None:
    """Run a site relay until SIGTERM/SIGINT: it answers its site's bundle fetch
    requests from its cache and fetches each bundle from the hub once
    (deploy/relay.example.toml)."""
    from cellwatch.hub.relay import Relay  # the relay's imports only where it runs

    settings = RelaySettings.load(config_path)
    setup_logging(settings.log_level)
    run_until_signalled(Relay(settings))


@main.command()
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


@main.group(invoke_without_command=True)
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


@main.command()
@connection
@friendly_errors
@operator
def nodes(client: HubClient, as_json: bool) -> None:
    """List the nodes the hub has seen, what they run and bytes fetched."""
    reply = client.nodes()
    emit(as_json, reply, render.nodes_table(reply.nodes, reply.sites))


@main.command()
@connection
@friendly_errors
@operator
def stats(client: HubClient, as_json: bool) -> None:
    """Bundle bytes served per node and bundle (kept across hub restarts)."""
    reply = client.stats()
    emit(as_json, reply, render.stats_view(reply))


@main.group()
def rollout() -> None:
    """Start, watch, pause, resume, abort and roll back rollouts."""


@rollout.command("start")
@click.argument("name")
@click.argument("version")
@click.option("--target", default="all", show_default=True, help="all | group:G | node:ID,ID")
@click.option("--waves", help="cumulative waves, e.g. 1,25%,100% (hub default)")
@click.option("--advance-at", type=float, help="share of a wave active to go on (0-1]")
@click.option("--max-failures", help="abort above this many failures: count or N%")
@click.option("--min-executed", type=int, help="finished nodes before the abort rule applies")
@click.option("--node-timeout", type=float, help="seconds a node has to become active")
@click.option("--request-id", help="idempotency key: the same id never starts twice")
@click.option(
    "--yes-untrained",
    is_flag=True,
    help="roll out a model with a flag: SYNTHETIC, UNTRAINED, UNVERIFIED-BASE, NO-SKILL or "
    "DEGRADED (refused without it)",
)
@click.option(
    "--shadow",
    "shadow_rate",
    metavar="RATE",
    callback=_checked(parse_rate),
    help="start with a shadow phase: the targets load the model beside their own and score "
    "this share of their live images with it (20% or 0.2; a ceiling: busy nodes skip)",
)
@click.option(
    "--promote-when",
    metavar="RULE",
    callback=_checked(parse_promote_when),
    help='promote on evidence, e.g. "agreement>=0.97,n>=300": the lower bound of the '
    "agreement's 95% interval reaches 0.97 with 300 images scored (it aborts itself when "
    "the upper bound falls below); without it only `rollout promote` promotes",
)
@click.option(
    "--shadow-for",
    metavar="DURATION",
    callback=_checked(parse_duration),
    help="pause the shadow phase for the operator after this long (90s, 30m, 2h, 1d)",
)
@connection
@friendly_errors
@operator
def rollout_start(
    client: HubClient,
    name: str,
    version: str,
    target: str,
    waves: str | None,
    advance_at: float | None,
    max_failures: str | None,
    min_executed: int | None,
    node_timeout: float | None,
    request_id: str | None,
    yes_untrained: bool,
    shadow_rate: str | None,
    promote_when: str | None,
    shadow_for: str | None,
    as_json: bool,
) -> None:
    """Roll model NAME VERSION out to the target nodes in waves.

    With --shadow, the rollout begins in phase `shadowing`: every target loads the model
    beside the one it serves and scores a share of its live images with it, after
    answering them with its own (a Result never waits for it, nor changes). The hub
    pools the agreement with a Wilson 95% interval; --promote-when starts the waves on
    that evidence, `rollout promote ID` on the operator's word.

    A model with a flag (see `cellwatch-hub models`, FLAGS: synthetic data, random
    or unverified base, no evidence of skill, degraded) needs --yes-untrained."""
    args = RolloutStartArgs(
        name=name,
        version=version,
        target=target,
        waves=waves,
        advance_at=advance_at,
        max_failures=max_failures,
        min_executed=min_executed,
        node_timeout_s=node_timeout,
        yes_untrained=yes_untrained,
        shadow=shadow_rate,
        promote_when=promote_when,
        shadow_for_s=parse_duration(shadow_for) if shadow_for is not None else None,
    )
    try:
        args.shadow_policy()  # the same check as the hub's, before connecting to it
    except ShadowSpecError as exc:
        raise click.UsageError(str(exc)) from exc
    info = client.rollout_start(args, request_id=request_id)
    if not as_json and info.existing:
        click.echo(f"rollout {info.rollout_id} already does this ({info.state}): not started again")
    emit(as_json, info, render.rollout_view(info))


@rollout.command("status")
@click.argument("rollout_id", required=False)
@click.option("--watch", is_flag=True, help="follow it live until it finishes")
@click.option("--interval", type=float, default=1.0, show_default=True, help="--watch period")
@connection
@friendly_errors
@operator
def rollout_status(
    client: HubClient, rollout_id: str | None, watch: bool, interval: float, as_json: bool
) -> None:
    """Show one rollout (default: the latest). With --watch, follow it until it ends and
    exit 0 if every node got where it was sent (completed or rolled back, no failure),
    1 otherwise (aborted, or a node failed or timed out)."""
    info = client.rollout_status(rollout_id)
    if not watch:
        emit(as_json, info, render.rollout_view(info))
        return
    info = _watch(client, info, interval, as_json)
    failures = sum(info.counts.get(s, 0) for s in TARGET_FAILURES)
    done = (RolloutState.COMPLETED, RolloutState.ROLLED_BACK)
    sys.exit(0 if info.state in done and not failures else 1)


def _watch(client: HubClient, info: RolloutInfo, interval: float, as_json: bool) -> RolloutInfo:
    if as_json or not sys.stdout.isatty():
        last = ""
        while True:
            line = (
                info.model_dump_json()
                if as_json
                else f"{info.rollout_id} {info.state} wave {info.wave + 1}/{len(info.waves)} "
                + " ".join(f"{k}={v}" for k, v in sorted(info.counts.items()))
            )
            key = json.dumps([info.state, info.counts, [t.progress for t in info.targets]])
            if key != last:
                click.echo(line)
                last = key
            if info.state in FINISHED_ROLLOUT_STATES:
                return info
            time.sleep(interval)
            info = client.rollout_status(info.rollout_id)
    with Live(render.rollout_view(info), console=_console(), auto_refresh=False) as live:
        while info.state not in FINISHED_ROLLOUT_STATES:
            time.sleep(interval)
            info = client.rollout_status(info.rollout_id)
            live.update(render.rollout_view(info), refresh=True)
    return info


@rollout.command("list")
@connection
@friendly_errors
@operator
def rollout_list(client: HubClient, as_json: bool) -> None:
    """The latest rollouts, newest first."""
    reply = client.rollout_list()
    emit(as_json, reply, render.rollouts_table(reply.rollouts))


def _verb(verb: str, doc: str) -> None:
    @rollout.command(verb, help=doc)
    @click.argument("rollout_id")
    @connection
    @friendly_errors
    @operator
    def command(client: HubClient, rollout_id: str, as_json: bool) -> None:
        info = client.rollout_verb(verb, rollout_id)
        emit(as_json, info, render.rollout_view(info))


_verb("pause", "Issue no new waves (nodes already told go on).")
_verb(
    "resume",
    "Continue a paused rollout (paused in its shadow phase: shadow for another --shadow-for).",
)
_verb(
    "promote",
    "End the shadow phase on the operator's word and begin the waves (the evidence so far "
    "is kept in its status).",
)
_verb("abort", "Stop the rollout for good; nodes already switched stay.")
_verb(
    "rollback",
    "Send every node the rollout switched back to the model it ran before "
    "(nodes keep recent bundles, so no download).",
)


@main.group()
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
