"""`cellwatch-hub`: run the hub (`serve`) and operate it (push, models, nodes,
rollout ...). Parses arguments, loads settings and calls library code; errors
become one line on stderr and exit code 2. The commands live by what they act on
(models.py, fleet.py, rollouts.py, samples.py); operator.py connects them to the hub.
"""

from __future__ import annotations

from pathlib import Path

import click

from cellwatch.hub.cli import fleet, models, rollouts, samples
from cellwatch.hub.cli.operator import CONNECTION_HELP
from cellwatch.hub.config import HubSettings, RelaySettings
from cellwatch.hub.service import HubService
from cellwatch.shared.cli import friendly_errors, run_until_signalled, setup_logging


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


for command in (
    models.push,
    models.models,
    fleet.nodes,
    fleet.stats,
    rollouts.rollout,
    samples.samples,
):
    main.add_command(command)
