#!/usr/bin/env python3
"""The project's Mosquitto in one directory: render its mosquitto.conf, make its
users, ACL and certificates with the deploy/ scripts, find the binary, pick free
ports and wait until it listens. The tests (tests/broker.py), the demo
(deploy/demolib/services.py) and the benches (through tests/broker.py) all use these
functions; each only starts and stops the process its own way.

    python deploy/broker_conf.py --src mosquitto.conf --out DIR --port N --tls-port M

writes DIR/mosquitto.conf: the same file with every listener moved to the given
ports (and bound to --bind), and every file or directory it names moved into DIR
(DIR/passwd, DIR/acl, DIR/certs/..., DIR/data/). Every other line is kept as it
is, so a test or staging broker runs the production settings. With --user, the
`user` line is replaced too (the tests run as root use their own user, because
the mosquitto user cannot read a private temporary directory).

Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

DEPLOY = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"

# Options whose value is one path, and where that file goes inside the out dir.
# None: keep the file name (certificates land in certs/, other files in DIR).
_FILE_OPTIONS: dict[str, str | None] = {
    "password_file": "passwd",
    "acl_file": "acl",
    "psk_file": "psk",
    "pid_file": "mosquitto.pid",
    "cafile": None,
    "certfile": None,
    "keyfile": None,
    "crlfile": None,
    "dhparamfile": None,
}
_CERT_OPTIONS = frozenset({"cafile", "certfile", "keyfile", "crlfile", "dhparamfile"})
_DIR_OPTIONS: dict[str, str] = {"persistence_location": "data", "capath": "certs"}
_TLS_OPTIONS = frozenset({"certfile", "keyfile", "psk_hint"})
# Options that would make the rendered broker read files outside the out dir.
_UNSUPPORTED = frozenset({"include_dir", "plugin", "auth_plugin"})


def _split(line: str) -> tuple[str, str] | None:
    """(option, value) of a config line, None for blank lines and comments."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    option, _, value = stripped.partition(" ")
    return option, value.strip()


def _listener_kinds(lines: list[str]) -> dict[int, bool]:
    """Line index of each `listener` -> whether its block configures TLS."""
    kinds: dict[int, bool] = {}
    current: int | None = None
    for i, line in enumerate(lines):
        parsed = _split(line)
        if parsed is None:
            continue
        option, _ = parsed
        if option == "listener":
            current = i
            kinds[i] = False
        elif option in _TLS_OPTIONS and current is not None:
            kinds[current] = True
    return kinds


def render(
    src_text: str,
    out_dir: Path,
    port: int,
    tls_port: int,
    bind: str = "127.0.0.1",
    *,
    user: str | None = None,
) -> str:
    """src_text with its listeners on port/tls_port and its paths inside out_dir.

    A listener block with a certfile/keyfile gets tls_port, any other gets port.
    ValueError if two listeners would share a port or the config uses an option
    this function cannot relocate.
    """
    out_dir = out_dir.resolve()
    lines = src_text.splitlines()
    kinds = _listener_kinds(lines)
    plain = [i for i, tls in kinds.items() if not tls]
    tls_listeners = [i for i, tls in kinds.items() if tls]
    if len(plain) > 1 or len(tls_listeners) > 1:
        raise ValueError(
            f"expected at most one plain and one TLS listener, got {len(plain)} plain "
            f"and {len(tls_listeners)} TLS"
        )

    out: list[str] = []
    for i, line in enumerate(lines):
        parsed = _split(line)
        if parsed is None:
            out.append(line)
            continue
        option, value = parsed
        if option in _UNSUPPORTED:
            raise ValueError(f"line {i + 1}: `{option}` is not supported by broker_conf.py")
        if option == "listener":
            out.append(f"listener {tls_port if kinds[i] else port} {bind}")
        elif option in _FILE_OPTIONS:
            name = _FILE_OPTIONS[option] or PurePosixPath(value).name
            where = out_dir / "certs" if option in _CERT_OPTIONS else out_dir
            out.append(f"{option} {where / name}")
        elif option in _DIR_OPTIONS:
            out.append(f"{option} {out_dir / _DIR_OPTIONS[option]}/")
        elif option == "log_dest" and value.split(" ", 1)[0] == "file":
            name = PurePosixPath(value.split(" ", 1)[1].strip()).name
            out.append(f"log_dest file {out_dir / name}")
        elif option == "user" and user is not None:
            out.append(f"user {user}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def write(
    src: Path,
    out_dir: Path,
    port: int,
    tls_port: int,
    bind: str = "127.0.0.1",
    *,
    user: str | None = None,
) -> Path:
    """Render src into out_dir/mosquitto.conf and create out_dir/data/; the new path."""
    text = render(src.read_text(), out_dir, port, tls_port, bind, user=user)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "certs").mkdir(parents=True, exist_ok=True)
    conf = out_dir / "mosquitto.conf"
    conf.write_text(text)
    return conf


def mosquitto_executable() -> str | None:
    """Path of the mosquitto binary (PATH or Debian's /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the broker binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/NAME with bash (not checked: the caller looks at returncode)."""
    return subprocess.run(
        ["bash", str(DEPLOY / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def make_files(
    out_dir: Path,
    nodes: Sequence[str],
    clients: Sequence[str] = (),
    hostnames: Sequence[str] = ("localhost",),
) -> list[str]:
    """Users, ACL and test certificates in out_dir, made by the deploy/ scripts as a
    production install would; returns the command lines run. RuntimeError with the
    script's output if one fails."""
    lab = [arg for name in clients for arg in ("--client", name)]
    steps = [
        ("mkusers.sh", [*lab, str(out_dir), *nodes]),
        ("mkacl.sh", [*lab, str(out_dir), *nodes]),
        ("mkcerts.sh", [str(out_dir), *hostnames]),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    ran = []
    for script, args in steps:
        proc = run_script(script, *args)
        if proc.returncode != 0:
            raise RuntimeError(
                f"deploy/{script} {' '.join(args)} failed with exit code {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        ran.append(" ".join([f"deploy/{script}", *args]))
    return ran


def wait_listening(
    ports: Sequence[int],
    alive: Callable[[], bool],
    timeout: float,
    host: str = LOOPBACK,
) -> list[int]:
    """Wait until every port accepts connections; returns the ones that did not within
    timeout, or all remaining ones as soon as alive() is False (the process exited)."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending and alive() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            time.sleep(0.02)
    return pending


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render mosquitto.conf with its ports and paths moved into one directory."
    )
    parser.add_argument("--src", type=Path, required=True, help="the project's mosquitto.conf")
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--port", type=_port, required=True, help="port of the plain listener")
    parser.add_argument("--tls-port", type=_port, required=True, help="port of the TLS listener")
    parser.add_argument("--bind", default="127.0.0.1", help="address every listener binds to")
    parser.add_argument("--user", help="replace the `user` line (the user to run as when root)")
    args = parser.parse_args(argv)
    if args.port == args.tls_port:
        parser.error("--port and --tls-port must differ")
    try:
        conf = write(args.src, args.out, args.port, args.tls_port, args.bind, user=args.user)
    except (OSError, ValueError) as exc:
        print(f"broker_conf.py: {exc}", file=sys.stderr)
        return 1
    print(conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
