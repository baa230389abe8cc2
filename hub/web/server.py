"""The HTTP server's thread: uvicorn serving the app on a socket bound before the
thread starts (so a port in use or a bad address is an error from `start()`, and
port 0 yields a real port). `stop()` asks uvicorn to finish and joins the thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import uvicorn

from cellwatch.hub.config import HttpSettings
from cellwatch.hub.errors import HubError
from cellwatch.hub.web.app import build_app
from cellwatch.hub.web.reader import FleetReader, HubSources

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise HubError(f"http.token_file: cannot read {path}: {exc}") from exc
    if len(token) < 16 or any(c.isspace() for c in token):
        raise HubError(
            f"http.token_file: {path} must hold one token of at least 16 characters "
            "without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token


class HttpServer:
    def __init__(self, settings: HttpSettings, sources: HubSources) -> None:
        self.settings = settings
        self.sources = sources
        self.port = settings.port
        self._reader: FleetReader | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    def start(self) -> None:
        """Bind, then serve in a thread; HubError if it cannot."""
        token = read_token(self.settings.token_file) if self.settings.token_file else None
        host = self.settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.settings.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise HubError(f"http: cannot listen on {self.settings.listen}: {exc}") from exc
        self.port = sock.getsockname()[1]
        self._reader = FleetReader(self.sources)
        config = uvicorn.Config(
            build_app(self._reader, self.settings, token),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name="hub-http", daemon=True
        )
        self._thread.start()
        log.info(
            "hub: fleet page on %s (JSON under %sapi/, Prometheus %smetrics)%s",
            self.url,
            self.url,
            self.url,
            ", bearer token required" if token else "",
        )

    def _run(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        except Exception:  # the hub goes on without its page; say so loudly
            log.exception("http: the server stopped with an error")
        finally:
            sock.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("http: the server did not stop within %.0f s", STOP_TIMEOUT_S)
            self._thread = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
