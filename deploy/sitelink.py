#!/usr/bin/env python3
"""A site's WAN link on one machine: a TCP forwarder between a site broker's bridge and
the central broker that counts the bytes each way and can be cut and restored.

    python deploy/sitelink.py --listen 127.0.0.1:PORT --to 127.0.0.1:CENTRAL [--state FILE]
                              [--rate-mb-s R]

The site broker's bridge connects to --listen instead of the central broker; every
byte is passed on to --to. SIGUSR1 cuts the link (every connection is closed, new ones
are refused: what a WAN outage looks like to the bridge), SIGUSR2 restores it, SIGTERM
stops. With --state, the counters are written there as JSON every second and at each
change: {"up": bool, "to_central": bytes, "from_central": bytes, "connections": n}.
--rate-mb-s bounds each direction's rate (a slow WAN).

`deploy/sites.py` (the demo topology) runs one per site; the tests and
`bench/sites.py` use `Link` in-process. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BUFFER = 64 * 1024


@dataclass(frozen=True)
class Counts:
    up: bool
    to_central: int
    """Bytes from the site (its bridge) to the central broker."""
    from_central: int
    connections: int
    """Connections accepted since start (each reconnect of the bridge is one)."""


class Link:
    """The forwarder (see the module docstring). `start()`, `down()`, `up()`, `close()`."""

    def __init__(
        self, listen: tuple[str, int], target: tuple[str, int], *, rate_bytes_s: float = 0
    ) -> None:
        self.target = target
        self.rate_bytes_s = rate_bytes_s
        """Each direction's rate bound (0: none); may be changed while it runs."""
        self._server = socket.create_server(listen, reuse_port=False)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._lock = threading.Lock()
        self._up = True
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._bytes = {"to_central": 0, "from_central": 0}
        self._connections = 0
        self._thread = threading.Thread(target=self._accept, name="sitelink", daemon=True)

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> Link:
        self._thread.start()
        return self

    def counts(self) -> Counts:
        with self._lock:
            return Counts(
                self._up, self._bytes["to_central"], self._bytes["from_central"], self._connections
            )

    def down(self) -> None:
        """Cut the link: close every connection, refuse new ones until up()."""
        with self._lock:
            self._up = False
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            _close(s)

    def up(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.down()
        _close(self._server)
        self._thread.join(timeout=5)

    # -- threads ---------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    _close(client)
                    return
                refuse = not self._up
            if refuse:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)  # the central broker is down: the bridge tries again
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if not self._up:
                    _close(client)
                    _close(server)
                    continue
                self._sockets.update((client, server))
                self._connections += 1
            pumps = ((client, server, "to_central"), (server, client, "from_central"))
            for src, dst, key in pumps:
                threading.Thread(
                    target=self._pump, args=(src, dst, key), name=f"sitelink-{key}", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, key: str) -> None:
        rate, started, moved = 0.0, 0.0, 0  # since the rate last changed
        try:
            while data := src.recv(BUFFER):
                dst.sendall(data)
                with self._lock:
                    self._bytes[key] += len(data)
                if self.rate_bytes_s != rate:
                    rate, started, moved = self.rate_bytes_s, time.monotonic(), 0
                if rate:
                    moved += len(data)
                    ahead = moved / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: use HOST:PORT")
    return host, int(port)


def _write_state(path: Path, link: Link) -> None:
    c = link.counts()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(c.__dict__) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to listen on")
    parser.add_argument("--to", type=_address, required=True, help="the central broker")
    parser.add_argument("--state", type=Path, help="write the counters here (JSON)")
    parser.add_argument("--rate-mb-s", type=float, default=0.0, help="bound each direction")
    args = parser.parse_args(argv)
    try:
        link = Link(args.listen, args.to, rate_bytes_s=args.rate_mb_s * 1e6).start()
    except OSError as exc:
        where = f"{args.listen[0]}:{args.listen[1]}"
        print(f"sitelink.py: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    # Signal handlers only queue what to do (they run on this thread, which may hold
    # the link's lock in counts()).
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for sig, what in ((signal.SIGUSR1, "down"), (signal.SIGUSR2, "up")):
        signal.signal(sig, lambda *_, what=what: todo.put(what))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: todo.put("stop"))
    while True:
        if args.state is not None:
            _write_state(args.state, link)
        try:
            what = todo.get(timeout=1.0)
        except queue.Empty:
            continue
        if what == "stop":
            break
        link.down() if what == "down" else link.up()
    link.close()
    if args.state is not None:
        _write_state(args.state, link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
