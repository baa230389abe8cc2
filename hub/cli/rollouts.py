"""`cellwatch-hub rollout start | status | list | pause | resume | promote | abort | rollback`."""

from __future__ import annotations

import json
import sys
import time

import click
from rich.live import Live

from cellwatch.hub import render
from cellwatch.hub.cli.operator import (
    checked,
    connection,
    console,
    emit,
    operator,
)
from cellwatch.hub.client import HubClient
from cellwatch.shared.cli import friendly_errors
from cellwatch.shared.hubapi import RolloutInfo, RolloutStartArgs
from cellwatch.shared.promotion import (
    ShadowSpecError,
    parse_duration,
    parse_promote_when,
    parse_rate,
)
from cellwatch.shared.states import FINISHED_ROLLOUT_STATES, TARGET_FAILURES, RolloutState


@click.group()
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
    callback=checked(parse_rate),
    help="start with a shadow phase: the targets load the model beside their own and score "
    "this share of their live images with it (20% or 0.2; a ceiling: busy nodes skip)",
)
@click.option(
    "--promote-when",
    metavar="RULE",
    callback=checked(parse_promote_when),
    help='promote on evidence, e.g. "agreement>=0.97,n>=300": the lower bound of the '
    "agreement's 95% interval reaches 0.97 with 300 images scored (it aborts itself when "
    "the upper bound falls below); without it only `rollout promote` promotes",
)
@click.option(
    "--shadow-for",
    metavar="DURATION",
    callback=checked(parse_duration),
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
    with Live(render.rollout_view(info), console=console(), auto_refresh=False) as live:
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
