"""The one hand-off queue between a thread that must never wait and its workers.

paho calls `on_message` and `on_publish` on its network thread, `on_publish` while it
holds its outgoing-message lock, which every `publish()` takes as well; OpenVINO's
completion callbacks must not stall either. Nothing called there may wait for a
worker: a full bounded queue once froze the hub's network, control and fetch threads
for good (the control thread publishing, the network thread waiting in `put` with
the lock held). So:

- `put` never waits and never drops. What it is given is bounded elsewhere (QoS 1
  messages by the receiver's Receive Maximum, acknowledgements by one's own
  publishes); past `capacity` it still takes the item and counts it
  (`over_capacity`), so a broker that sends more than it should is seen, not fatal.
- `offer` refuses an item when `high_water` (default `capacity`) are waiting: for
  what nothing else bounds (QoS 0 telemetry, a burst of fetch requests); the caller
  counts the drop.
- `get` waits (up to a timeout) for the oldest item; `close` wakes every waiting
  worker and hands back what nobody took.
- Back-pressure without waiting: `on_full` is called when `capacity` items wait,
  `on_room` when a `get` brings it below again (the node holds and releases the
  reading of its MQTT connection with them: shared/mqttloop.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(
        self,
        capacity: int | None = None,
        *,
        name: str = "queue",
        on_full: Callable[[], None] | None = None,
        on_room: Callable[[], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.name = name
        self._on_full = on_full
        self._on_room = on_room
        self._full = False
        self._items: deque[T] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.peak = 0
        """Largest depth seen (the fleet page and /metrics show the hub's)."""
        self.over_capacity = 0
        """Items `put` took although `capacity` were already waiting."""

    def __len__(self) -> int:
        return len(self._items)  # deque's len is atomic: no lock needed for a gauge

    def put(self, item: T) -> bool:
        """Append item; never waits, never drops. False when it went in over capacity."""
        with self._cond:
            self._items.append(item)
            depth = len(self._items)
            if depth > self.peak:
                self.peak = depth
            self._cond.notify()
            over = self.capacity is not None and depth > self.capacity
            if over:
                self.over_capacity += 1
            filled = self._filled(depth)
        if filled and self._on_full is not None:
            self._on_full()
        if over:
            log.warning(
                "%s: %d waiting, over its capacity of %s: taken anyway (%d so far)",
                self.name,
                depth,
                self.capacity,
                self.over_capacity,
            )
        return not over

    def offer(self, item: T, high_water: int | None = None) -> bool:
        """Append item unless high_water (default: capacity) items are already
        waiting (then False: the caller counts the drop)."""
        limit = high_water if high_water is not None else self.capacity
        with self._cond:
            if limit is not None and len(self._items) >= limit:
                return False
            self._items.append(item)
            self.peak = max(self.peak, len(self._items))
            self._cond.notify()
            filled = self._filled(len(self._items))
        if filled and self._on_full is not None:
            self._on_full()
        return True

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, waiting up to timeout (None: for good); None once closed;
        queue.Empty if nothing came in time."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                raise queue.Empty
            if not self._items:
                return None
            item = self._items.popleft()
            room = self._full and self.capacity is not None and len(self._items) < self.capacity
            if room:
                self._full = False
        if room and self._on_room is not None:
            self._on_room()
        return item

    def _filled(self, depth: int) -> bool:
        """Lock held: True once when depth reaches capacity."""
        if self._full or self.capacity is None or depth < self.capacity:
            return False
        self._full = True
        return True

    def close(self) -> list[T]:
        """Wake every waiting `get` (they return None from now on); returns the items
        nobody took."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            room, self._full = self._full, False
        if room and self._on_room is not None:
            self._on_room()
        return left
