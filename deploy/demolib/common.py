"""Shared pieces of the demo: constants, the working-directory layout, output helpers."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
DEFAULT_WORKDIR = Path("demo-work")
MARKER = ".cellwatch-demo"
NODES = ("node-1", "node-2")
UP_NODES = ("node-1",)
MODEL_NAME = "all-inception-v3"
LABELS = ("normal", "ALL")
SOURCE = "demo-scope"
LAB_ACCOUNT = "client"
"""The lab's MQTT account: a Result's `source`, and what a node's [samples] consent names."""
SAMPLE_RANDOM_SHARE = 0.5
"""The share of the lab's images the demo's nodes keep as `random` samples."""
WAVES = "1,100%"
HOST = "127.0.0.1"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
ROLLOUT_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 120.0
TRAIN_TIMEOUT_S = 1800.0

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
log = logging.getLogger("cellwatch.demo")


class DemoError(Exception):
    """A step failed; the message says what and where to look."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop everything and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Profile:
    """How big a run is: `make demo` or the shortened `--quick` (same code path)."""

    images: int
    epochs: int
    precision: str
    swap_rate: float
    after_swap_s: float
    int8_methods: tuple[str, str]
    """`export --int8-method` for v1 and v2: plain quantisation; an int8 model that
    misses the gate is replaced by fp16 (and the demo says so). NNCF's accuracy-aware
    quantisation takes 2-6 minutes on a fast 2-core CPU and over 5 on a slow one, so
    only `make demo INT8=accurate` (`--int8 accurate`) runs it, for v1."""
    field_images: int
    """The SYNTHETIC batch "from the field" of step 6 (another seed, another stain)."""
    allow_no_skill: bool = False
    """Export even without evidence of skill (a quick run has too few test images to
    show any); the bundle is labelled no-skill."""


FULL = Profile(
    images=120,
    epochs=20,
    precision="int8",
    swap_rate=8.0,
    after_swap_s=5.0,
    int8_methods=("ptq", "ptq"),
    field_images=40,
)
QUICK = Profile(
    images=40,
    epochs=1,
    precision="int8",
    swap_rate=6.0,
    after_swap_s=3.0,
    int8_methods=("ptq", "ptq"),
    field_images=16,
    allow_no_skill=True,
)


# -- the working directory ------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where everything of one demo lives (all under one directory)."""

    root: Path

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pidfile(self) -> Path:
        return self.root / "pids"

    @property
    def signing(self) -> Path:
        return self.root / "signing"

    @property
    def sign_key(self) -> Path:
        return self.signing / "cellwatch.key"

    @property
    def trusted(self) -> Path:
        return self.root / "trusted-keys"

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def hub_toml(self) -> Path:
        return self.hub / "hub.toml"

    def node(self, node_id: str) -> Path:
        return self.root / node_id

    def node_toml(self, node_id: str) -> Path:
        return self.node(node_id) / "node.toml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def field(self) -> Path:
        """Step 6: the batch sent, the export, and its two labelled halves."""
        return self.root / "field"

    @property
    def split_v2(self) -> Path:
        """Version 2's split: the data set and the field samples' training half."""
        return self.root / "split-v2"

    @property
    def client_toml(self) -> Path:
        return self.root / "client.toml"

    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def bottlenecks(self) -> Path:
        """`fit --cache` of every version: version 2's split reuses version 1's features."""
        return self.root / "bottlenecks"

    def run_dir(self, tag: str) -> Path:
        return self.root / "runs" / tag

    def bundle(self, tag: str) -> Path:
        return self.root / "bundles" / tag

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def secret(self, user: str) -> Path:
        return self.broker / "secrets" / f"{user}.password"

    @property
    def ca_file(self) -> Path:
        return self.broker / "certs" / "ca.crt"


def shown(path: Path | str) -> str:
    """A path as short as possible for the reader (relative to the current directory)."""
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.relative_to(Path.cwd()))
    return str(p)


# -- narration ----------------------------------------------------------------------


def stage(number: int, total: int, title: str, why: str) -> None:
    console.print()
    console.rule(f"[bold]Step {number}/{total} · {escape(title)}", align="left")
    console.print(f"[dim]{escape(why)}[/dim]")


def doing(text: str) -> None:
    console.print(f"  • {escape(text)}")


def done(text: str) -> None:
    console.print(f"  [green]✓[/green] {escape(text)}")


def command(argv: Sequence[str]) -> None:
    args = [
        Path(a).name if i == 0 else shown(a) if a.startswith("/") else a for i, a in enumerate(argv)
    ]
    console.print(f"    [cyan]$ {escape(' '.join(args))}[/cyan]")


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`."""
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


@dataclass
class Timings:
    """Wall-clock seconds of each phase, in order; each phase says its time when it ends."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            elapsed = time.monotonic() - start
            self.phases[name] = round(elapsed, 1)
            if ok:
                console.print(f"  [dim]⏱ {escape(name)}: {duration(elapsed)}[/dim]")
