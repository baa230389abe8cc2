"""The network thread of one MQTT connection, with back-pressure that never waits.

paho's own `loop_start()` thread reads whatever the broker sends. The only way a
receiver can push back on a broker that sends faster than it works is to stop
reading, so that TCP stops the broker; Receive Maximum cannot be relied on
(Mosquitto 2.0.11 sends far more than it once acknowledgements flow: measured, 134
unacknowledged messages against a Receive Maximum of 2). Parking paho's thread inside
a callback stopped the reading, but it also stopped every write: Results, acks and
keepalive pings waited with it.

This thread drives paho through its external-loop API (`loop_read`, `loop_write`,
`loop_misc`) instead, and reconnects with backoff as paho's loop does (its owner hears
of each connection that cannot be opened, and may end the thread: a first connection
to a closed port is not tried again). `hold()` stops
the reading while writes, acknowledgements and keepalive go on; a hold is honoured
for at most `max_hold_s` at a time (then one read pass happens, so that the broker's
PINGRESP is read before paho's keepalive check gives up on the connection), and
`release()` resumes reading at once. Nothing else changes: callbacks run on this
thread exactly as on paho's, and only this thread writes to the socket (publishers
on other threads queue their packets and `wake()` it).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

SELECT_S = 1.0
"""Longest wait for the socket: keepalive and reconnect checks run at least this often."""
FLUSH_S = 2.0
"""At a stop, how long pending packets (a DISCONNECT) may take to be written."""


class NetworkLoop:
    def __init__(
        self,
        client: paho.Client,
        *,
        name: str,
        max_hold_s: float,
        backoff: Callable[[], tuple[float, float]],
        on_connect_error: Callable[[OSError], bool] = lambda exc: False,
    ) -> None:
        self._client = client
        self._name = name
        self.max_hold_s = max_hold_s
        self._backoff = backoff
        """(first, most) reconnect delay, read at every reconnect."""
        self._on_connect_error = on_connect_error
        """Told why a connection could not be opened; True: stop trying (the thread
        ends)."""
        self._delay: float | None = None
        self._halt = threading.Event()
        self._closing = False
        self._held = False
        """Set by hold() and release() (any thread)."""
        self._hold_start: float | None = None
        """When the current hold began reading nothing (this thread only)."""
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._flush_at_stop = True
        # With a register-write callback set, paho never writes from a publisher's
        # thread (its direct write in _packet_queue is for unthreaded use): only here.
        # The callback itself does nothing: whoever queues a packet calls wake().
        client.on_socket_register_write = lambda c, userdata, sock: None

    # -- control (any thread) --------------------------------------------------------
    def start(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the socket again now (packets were queued, a hold ended)."""
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):  # already awake (the pair is full), or closed
                wake.send(b"\0")

    def hold(self) -> None:
        """Stop reading from the broker (see the module docstring)."""
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.wake()

    @property
    def held(self) -> bool:
        return self._held

    def connected_then_closing(self) -> None:
        """The client asked paho to disconnect: stop once the DISCONNECT is written."""
        self._closing = True
        self.wake()

    def reset_backoff(self) -> None:
        """A connection succeeded: the next reconnect waits the shortest delay again."""
        self._delay = None

    def stop(self, timeout: float = FLUSH_S + SELECT_S, *, flush: bool = True) -> None:
        """End the thread (after writing what is queued, within timeout, unless not
        flush) and close the socket if it is still open."""
        self._closing = True
        self._flush_at_stop = flush
        self._halt.set()
        self.wake()
        thread = self._thread
        if thread is threading.current_thread():
            return  # the loop ends after this callback
        if thread is not None:
            thread.join(timeout)
        if thread is not None and thread.is_alive():
            log.warning("%s: the network thread did not stop within %.0f s", self._name, timeout)
            return
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        c = self._client
        attempts = 0
        try:
            while not self._halt.is_set():
                if c.socket() is None:
                    if self._closing:
                        return
                    if attempts and not self._wait_backoff():
                        return
                    attempts += 1
                    try:
                        c.reconnect()
                    except OSError as exc:
                        if self._on_connect_error(exc):
                            return
                        log.debug("%s: cannot connect: %s", self._name, exc)
                    continue
                self._pump()
            if self._flush_at_stop:
                self._flush()
        except Exception:  # the thread must not die silently
            log.exception("%s: network loop failed", self._name)

    def _wait_backoff(self) -> bool:
        first, most = self._backoff()
        self._delay = first if self._delay is None else min(self._delay * 2, most)
        return not self._halt.wait(self._delay)

    def _reading(self, now: float) -> bool:
        """Whether to read now: not held, or held for max_hold_s (then one pass)."""
        if not self._held:
            self._hold_start = None
            return True
        if self._hold_start is None:
            self._hold_start = now
        if now - self._hold_start >= self.max_hold_s:
            self._hold_start = now  # one read pass, then the hold goes on
            return True
        return False

    def _pump(self) -> None:
        """One pass: wait for the socket (or a wake-up), read, write, keepalive."""
        c = self._client
        sock = c.socket()
        if sock is None:
            return
        now = time.monotonic()
        reading = self._reading(now)
        pending = sock.pending() if reading and hasattr(sock, "pending") else 0
        if pending:
            timeout = 0.0  # TLS holds decrypted bytes select cannot see
        elif not reading and self._hold_start is not None:
            timeout = max(0.0, min(SELECT_S, self._hold_start + self.max_hold_s - now))
        else:
            timeout = SELECT_S
        assert self._wake_r is not None
        rlist: list[Any] = [self._wake_r, sock] if reading else [self._wake_r]
        wlist: list[Any] = [sock] if c.want_write() else []
        try:
            readable, _, _ = select.select(rlist, wlist, [], timeout)
        except (OSError, ValueError, TypeError):
            readable = []  # the socket was closed under us: paho notices below
        if self._wake_r in readable:
            self._drain_wake()
        rc = paho.MQTT_ERR_SUCCESS
        if reading and self._held and self._hold_start is None:
            reading = False  # held while we waited: from now on
            self._hold_start = time.monotonic()
        if reading and (sock in readable or pending):
            rc = c.loop_read()
        if rc == paho.MQTT_ERR_SUCCESS and c.socket() is not None and c.want_write():
            c.loop_write()
        if c.socket() is not None:
            c.loop_misc()

    def _flush(self) -> None:
        """Write what is queued (a DISCONNECT closes the socket once written)."""
        c = self._client
        deadline = time.monotonic() + FLUSH_S
        while (sock := c.socket()) is not None and c.want_write():
            if time.monotonic() >= deadline:
                return
            try:
                select.select([], [sock], [], 0.1)
            except (OSError, ValueError, TypeError):
                return
            if c.loop_write() != paho.MQTT_ERR_SUCCESS:
                return

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while self._wake_r.recv(4096):
                pass
