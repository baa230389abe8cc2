"""The node's queue of received images waiting for a decode worker.

Back-pressure without ever parking paho's network thread for good: `put` waits for
room at most `wait_s` (while it waits, paho reads nothing, so TCP pushes back on the
broker), then takes the image anyway. Room runs out only when the broker sends more
than the node's Receive Maximum (Mosquitto 2.0 does once acknowledgements flow; its
own `max_inflight_messages` still bounds it), so the excess is small, counted and
logged. An image is never dropped or left unacknowledged here.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Backlog(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.over_capacity = 0
        """Images taken in after `wait_s` although the backlog was full."""
        self.peak = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T, wait_s: float) -> bool:
        """Append item, waiting up to wait_s for room; False if it went in over capacity."""
        with self._cond:
            room = self._cond.wait_for(lambda: len(self._items) < self.capacity, wait_s)
            if not room:
                self.over_capacity += 1
                log.warning(
                    "backlog full (%d images) for %.1f s: taking one more rather than "
                    "stalling the MQTT connection (%d so far)",
                    len(self._items),
                    wait_s,
                    self.over_capacity,
                )
            self._items.append(item)
            self.peak = max(self.peak, len(self._items))
            self._cond.notify_all()
            return room

    def get(self) -> T | None:
        """The oldest item; None once closed and empty (the worker should exit)."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> list[T]:
        """Wake every worker to exit; returns the items nobody started."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return left
