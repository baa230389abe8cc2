"""What the node and the hub daemons share: one stop event, named worker threads,
and the start/stop/wait/join/abort surface `shared.cli.run_until_signalled` drives."""

from __future__ import annotations

import threading
from collections.abc import Callable

from cellwatch.shared.mqtt import MqttClient


class Daemon:
    """Base of NodeService and HubService; subclasses implement start() and join()."""

    mqtt: MqttClient

    def __init__(self, name: str) -> None:
        self.name = name
        self.exit_code = 0
        """Non-zero when the daemon stopped itself because of a failure."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _spawn(self, target: Callable[[], None], role: str) -> None:
        """Start a daemon thread named `{name}-{role}` (joined by the subclass's join)."""
        thread = threading.Thread(target=target, name=f"{self.name}-{role}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Ask the daemon to stop (signal-safe); `join()` performs the shutdown."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def abort(self) -> None:
        """Release the connection after a failed start (no orderly shutdown)."""
        self.mqtt.disconnect()
