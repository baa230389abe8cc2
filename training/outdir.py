"""Output directories that appear whole or not at all.

Every command that writes a directory (synth, prepare, fit, export) builds it in a
hidden temporary directory beside the target and renames it into place at the end;
on any error the temporary directory is removed, so nothing half-done is left. An
existing target is refused unless `force` is given, and even then it is replaced only
if it holds the marker file that command writes (so `--force` cannot delete an
unrelated directory).
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cellwatch.training.errors import TrainingError

log = logging.getLogger(__name__)


def check_target(out: Path, *, marker: str, force: bool, what: str) -> None:
    """TrainingError if out exists and may not be replaced (call before long work)."""
    if not out.exists():
        if not out.parent.is_dir():
            raise TrainingError(f"parent directory {out.parent} of the {what} does not exist")
        return
    if not force:
        raise TrainingError(f"{out} already exists (use --force to replace the {what})")
    if not out.is_dir() or not (out / marker).is_file():
        raise TrainingError(f"refusing to replace {out}: it is not a {what} (no {marker} in it)")


@contextmanager
def staged_dir(out: Path, *, marker: str, force: bool, what: str) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes out when the block succeeds."""
    check_target(out, marker=marker, force=force, what=what)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    tmp.mkdir()  # unlike mkdtemp, honours the umask: the result gets normal permissions
    try:
        yield tmp
        if not (tmp / marker).is_file():  # pragma: no cover - programming error
            raise TrainingError(f"internal error: {what} has no {marker}")
        if out.exists():
            check_target(out, marker=marker, force=force, what=what)
            old = out.with_name(f".{out.name}.replaced")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote %s", out)
