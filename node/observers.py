"""After the answer: the node's observers of its live images, on a low-priority thread.

The one seam for work a Result must never wait for. Once the broker has a Result
(the pipeline's `_done`, on paho's network thread), the pipeline offers an
`Observation` here: the published Result, the preprocessed input the model saw, the
image as received, and the model that answered. `offer` never waits: past
`capacity` waiting observations the newest is not taken, and each observer is told
(`missed`, which only counts). One thread, niced below the image path (+10), hands
each observation to every observer in turn (`observe`), with `waiting()`: how many
live images wait for their Result now, so that costly work (the shadow candidate's
inference) can be skipped and counted instead of competing with them.

Observers today: drift (node/drift.py: every image's figures against the bundle's
reference) and the shadow scorer (node/shadow.py: a share of the images through the
candidate). Field-sample selection (issue 20) hooks in here too. An observer that
raises is logged and the thread goes on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cellwatch.node.engine import ServingModel
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.schemas import Result

log = logging.getLogger(__name__)

OBSERVATION_QUEUE = 64
"""Observations waiting for the observer thread at most (about 17 MB of 299x299
inputs); beyond, the newest are missed and counted."""
OBSERVER_NICENESS = 10
"""How much lower the observer thread's scheduling priority is (Linux: per thread)."""


@dataclass(frozen=True, slots=True)
class Observation:
    """One answered image, as its Result went out."""

    result: Result
    """The published ok Result."""
    pixels: np.ndarray
    """The model's input: uint8 (1, S, S, 3), the central crop resized."""
    payload: bytes
    """The image as received (never published by an observer: issue 20 re-encodes the
    pixels of consented sources only)."""
    width: int
    height: int
    """The image's size from its header."""
    model: ServingModel
    """The model that answered."""


class Observer(Protocol):
    def observe(self, obs: Observation, waiting: Callable[[], int]) -> None:
        """On the observer thread; waiting(): live images without a Result right now."""

    def missed(self, obs: Observation) -> None:
        """On the offering thread (never waits): the queue was full, obs is dropped."""


class Observers:
    def __init__(
        self,
        node_id: str,
        waiting: Callable[[], int],
        capacity: int = OBSERVATION_QUEUE,
    ) -> None:
        self.node_id = node_id
        self.waiting = waiting
        self._observers: list[Observer] = []
        self._queue: Handoff[Observation] = Handoff(capacity, name=f"node {node_id}: observers")
        self.missed = 0
        self.done = 0
        """Observations every observer has seen (since start)."""

    def add(self, observer: Observer, *, first: bool = False) -> None:
        """Register an observer (before the thread starts); `first`: ahead of the others
        (the shadow scorer, whose skip rule looks at the live images waiting right after
        the answer, not after the other observers' work)."""
        if first:
            self._observers.insert(0, observer)
        else:
            self._observers.append(observer)

    def offer(self, obs: Observation) -> None:
        """Hand an answered image over; never waits (see the module docstring)."""
        if not self._observers:
            return
        if self._queue.offer(obs):
            return
        self.missed += 1
        for o in self._observers:
            try:
                o.missed(obs)
            except Exception:
                log.exception("node %s: observer %s failed on a missed image", self.node_id, o)

    def run(self) -> None:
        """The observer thread, until `close`."""
        _lower_priority(self.node_id)
        while (obs := self._queue.get()) is not None:
            for o in self._observers:
                try:
                    o.observe(obs, self.waiting)
                except Exception:  # one observer's bug must not end the thread
                    log.exception(
                        "node %s: observer %s failed on image %s",
                        self.node_id,
                        type(o).__name__,
                        obs.result.image_id,
                    )
            self.done += 1

    def close(self) -> None:
        self._queue.close()


def _lower_priority(node_id: str) -> None:
    """Nice this thread (Linux applies setpriority to one thread given its id)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + OBSERVER_NICENESS
        )
    except (AttributeError, OSError) as exc:  # another OS: the skip rule still holds
        log.info("node %s: observer thread keeps its priority (%s)", node_id, exc)
