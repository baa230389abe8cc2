"""A second process with this node's id: notice it, back off, give up.

Each connection with the node's client id takes the session from the other. The node
notices it by an `online` status of its own node id with another boot_id (it reads
its own retained status, which the broker replays on every subscribe; Mosquitto
2.0.11 closes a taken-over connection without the DISCONNECT 0x8E that newer brokers
send, which it notices too). It counts one takeover per connection, waits longer
before each reconnect instead of fighting for the session, and after
TAKEOVERS_BEFORE_EXIT takeovers within TAKEOVER_WINDOW_S stops with exit code
EXIT_NODE_ID_CONFLICT. Everything here runs on paho's network thread and only
counts and logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cellwatch.shared.limits import MAX_NODE_MESSAGE_BYTES
from cellwatch.shared.mqtt import SESSION_TAKEN_OVER
from cellwatch.shared.rpc import Inbound, Rejected, Route
from cellwatch.shared.schemas import NodeStatus
from cellwatch.shared.settings import client_log_name
from cellwatch.shared.states import NodeState
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

TAKEOVERS_BEFORE_EXIT = 3
"""Session takeovers (another process with our client id) within TAKEOVER_WINDOW_S
after which the node gives up and exits non-zero."""
TAKEOVER_WINDOW_S = 600.0
TAKEOVER_BACKOFF_MAX_S = 300.0
"""After the k-th takeover the node waits reconnect_max_s x 2^(k-1) (at most this)
before it connects again: the other process keeps the connection meanwhile, instead of
the two taking it from each other every second."""
EXIT_NODE_ID_CONFLICT = 4

Backoff = Callable[[float, float], None]
"""Set the reconnect delay: (first, most)."""


class Identity:
    def __init__(
        self,
        node_id: str,
        client_id: str,
        boot_id: str,
        *,
        reconnect_max_s: float,
        backoff: Backoff,
        give_up: Callable[[int], None],
    ) -> None:
        self.node_id = node_id
        self.log_name = client_log_name(client_id)
        self.boot_id = boot_id
        self.reconnect_max_s = reconnect_max_s
        self._backoff = backoff
        self._give_up = give_up
        self._takeovers: list[float] = []
        self._counted = False
        """A takeover of the current connection was counted already."""

    def route(self, topics: Topics) -> Route[NodeStatus]:
        """The node's own retained status (what another process may have written)."""
        return Route(
            topics.status(self.node_id),
            NodeStatus.model_validate_json,
            self.on_own_status,
            max_bytes=MAX_NODE_MESSAGE_BYTES,
            on_rejected=_ignore,
            empty_clears=True,
            name="own status",
        )

    def on_connected(self, session_present: bool) -> None:
        self._counted = False

    def on_disconnected(self, reason: object) -> None:
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self._taken_over("the broker said: Session taken over")

    def on_own_status(self, inbound: Inbound[NodeStatus]) -> None:
        """The retained status the broker replays when we (re)subscribe is the node's
        current state: `online` from another boot means another process holds our node
        id. Live copies are history (a resumed session may hold our predecessor's)."""
        status = inbound.body
        if not inbound.message.retained:
            return
        if status.boot_id != self.boot_id and status.state is NodeState.ONLINE:
            self._taken_over(f"process {status.boot_id[:8]} says it is node {self.node_id}")

    def _taken_over(self, evidence: str) -> None:
        """Count a takeover (once per connection), back off, give up after a few."""
        if self._counted:
            return
        self._counted = True
        now = time.monotonic()
        self._takeovers = [t for t in self._takeovers if now - t < TAKEOVER_WINDOW_S] + [now]
        count = len(self._takeovers)
        if count >= TAKEOVERS_BEFORE_EXIT:
            log.error(
                "node %s: session taken over %d times in %.0f s: another process runs with "
                "node id %s (client id %s). Exiting with code %d; stop the duplicate.",
                self.node_id,
                count,
                TAKEOVER_WINDOW_S,
                self.node_id,
                self.log_name,
                EXIT_NODE_ID_CONFLICT,
            )
            self._give_up(EXIT_NODE_ID_CONFLICT)
            return
        backoff = min(TAKEOVER_BACKOFF_MAX_S, self.reconnect_max_s * 2 ** (count - 1))
        log.error(
            "node %s: another process connected with our client id %s and took our session "
            "(%s; %d of %d); reconnecting after %.0f s instead of taking it back at once",
            self.node_id,
            self.log_name,
            evidence,
            count,
            TAKEOVERS_BEFORE_EXIT,
            backoff,
        )
        self._backoff(backoff, max(backoff, self.reconnect_max_s))


def _ignore(rejected: Rejected) -> None:
    """Not a status we can read: not evidence of anything."""
