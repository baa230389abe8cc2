"""Click parameter types the `cellwatch-train` commands share."""

from __future__ import annotations

from pathlib import Path

import click

PATH = click.Path(path_type=Path)
FRACTION = click.FloatRange(0, 1)
