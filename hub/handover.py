"""The hand-over from paho's network thread to the hub's control thread.

paho calls `on_message` and `on_publish` on its network thread, `on_publish` while it
holds its outgoing-message lock, which every `publish()` takes as well. So nothing
called there may wait for the control thread: a full bounded queue once froze the
network, control and fetch threads for good (the control thread publishing, the
network thread waiting in `put` with the lock held). `put` here never waits and
never drops: what it is given is bounded elsewhere (QoS 1 messages by the hub's
Receive Maximum, broker acknowledgements by the hub's own publishes). QoS 0
telemetry, which no Receive Maximum bounds, goes through `offer`, which refuses it
above a high-water mark (the caller counts the drop).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Handover(Generic[T]):
    """An unbounded FIFO whose writers never wait; one or more readers."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self.peak = 0
        """Largest depth seen (the fleet page and /metrics show it)."""

    def __len__(self) -> int:
        return len(self._items)  # deque's len is atomic: no lock needed for a gauge

    def put(self, item: T) -> None:
        """Append item; never waits for room, never drops."""
        with self._cond:
            self._items.append(item)
            self.peak = max(self.peak, len(self._items))
            self._cond.notify()

    def offer(self, item: T, high_water: int) -> bool:
        """Append item unless high_water items are already waiting (then False)."""
        with self._cond:
            if len(self._items) >= high_water:
                return False
            self._items.append(item)
            self.peak = max(self.peak, len(self._items))
            self._cond.notify()
            return True

    def get(self, timeout: float | None = None) -> T:
        """The oldest item; queue.Empty if none came within timeout (None: wait)."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise queue.Empty
            return self._items.popleft()
