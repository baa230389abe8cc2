"""`cellwatch-train`: synth, groups, prepare, fit, evaluate, export, keygen, sign.

Only argument parsing and printing; the work is in the library modules, imported
inside each command so `--help` does not load TensorFlow. Every CellwatchError
(a user's mistake or a failed check) becomes one line on stderr and exit code 2;
a model that fails the export gate exits with code 3. The commands live by what they
make: data.py (synth, prepare, groups), model.py (fit, evaluate), bundle.py (export,
keygen, sign).
"""

from __future__ import annotations

import click

from cellwatch.shared.cli import setup_logging
from cellwatch.training.cli import bundle, data, model
from cellwatch.training.progress import NOISY_LOGGERS, log_handler


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """Train the cellwatch ALL classifier (TF-Slim Inception V3) and export signed bundles.

    Research use only; not for diagnosis.
    """
    setup_logging("DEBUG" if verbose else "INFO", handler=log_handler(), quiet=NOISY_LOGGERS)


for command in (
    data.synth,
    data.groups,
    data.prepare,
    model.fit,
    model.evaluate,
    bundle.export,
    bundle.keygen,
    bundle.sign,
):
    main.add_command(command)
