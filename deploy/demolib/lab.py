"""The demo's lab side: the lab client library (`cellwatch.client`) as a microscope PC
uses it, for the held-out test images (step 5) and a steady stream during the swap
(step 7), and the field batch (step 6)."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellwatch.client import Answer, Client, ClientSettings
from cellwatch.shared.settings import MqttSettings
from demolib.common import DRAIN_TIMEOUT_S, LABELS, SOURCE
from demolib.summary import Counts


def truth_of(image: Path) -> str | None:
    """ALL-IDB names: `_1` is an ALL blast, `_0` a normal lymphocyte."""
    suffix = image.stem.rsplit("_", 1)[-1]
    return {"0": LABELS[0], "1": LABELS[1]}.get(suffix)


def lab_settings(mqtt: MqttSettings) -> ClientSettings:
    """One attempt per image: a retry would hide an image a node lost in the swap, which
    is what the demo shows does not happen."""
    return ClientSettings(
        mqtt=mqtt,
        source=SOURCE,
        timeout_s=DRAIN_TIMEOUT_S,
        retry_after_s=DRAIN_TIMEOUT_S,
        max_attempts=1,
    )


@dataclass(frozen=True)
class Answered:
    """One answer and when it came (time.monotonic())."""

    answer: Answer
    at: float

    @property
    def version(self) -> str | None:
        r = self.answer.result
        return r.model.version if r is not None and r.model is not None else None

    @property
    def failed(self) -> bool:
        return not self.answer.ok


def count(sent: int, answers: Sequence[Answered]) -> Counts:
    """What the caller got for `sent` images: answered, failed (an error Result or no
    Result), missing (no answer at all), by version and node, the first errors."""
    got = [a.answer for a in answers if a.answer.result is not None]
    errors = [f"{Path(a.input).name}: {a.status}" for a in (x.answer for x in answers) if not a.ok]
    return Counts(
        sent=sent,
        answered=len(got),
        failed=sum(1 for a in answers if a.failed),
        missing=sent - len(answers),
        by_version=dict(Counter(a.version for a in answers if a.version is not None)),
        by_node=dict(Counter(r.node_id for r in (a.result for a in got) if r is not None)),
        errors=errors[:10],
    )


class Lab:
    """A lab client logged in as `client`: `cellwatch.client.Client`, nothing of its own."""

    def __init__(self, mqtt: MqttSettings) -> None:
        self.client = Client(lab_settings(mqtt))

    def connect(self) -> None:
        self.client.connect()

    def close(self) -> None:
        self.client.close()

    def classify(self, images: Sequence[Path], window: int) -> list[Answered]:
        """Each image once, `window` in flight; answers in the order they came."""
        return [
            Answered(a, time.monotonic())
            for a in self.client.classify_many(images, concurrency=window)
        ]


def median_ms(answers: Sequence[Answered]) -> float:
    trips = [a.answer.round_trip_s * 1000 for a in answers if a.answer.round_trip_s is not None]
    return statistics.median(trips) if trips else 0.0


class Traffic:
    """Images at a steady rate from a background thread, through `classify_many` (at
    most `window` in flight), until `stop()`; every answer is kept with its time."""

    def __init__(self, lab: Lab, images: Sequence[Path], rate: float, window: int = 40) -> None:
        self.lab = lab
        self.images = list(images)
        self.period = 1.0 / rate
        self.window = window
        self.answers: list[Answered] = []
        self.sent = 0
        self.error: str | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop sending; returns once every image sent was answered (or timed out)."""
        self._stop.set()
        self.stopped_at = time.monotonic()
        self._thread.join(DRAIN_TIMEOUT_S + 30)

    def snapshot(self) -> Counts:
        with self._lock:
            return count(self.sent, list(self.answers))

    def _paced(self) -> Iterator[Path]:
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            with self._lock:
                self.sent += 1
            yield self.images[i % len(self.images)]
            i += 1
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _run(self) -> None:
        try:
            for answer in self.lab.client.classify_many(self._paced(), concurrency=self.window):
                with self._lock:
                    self.answers.append(Answered(answer, time.monotonic()))
        except Exception as exc:  # reported by step 7, never lost in the thread
            self.error = f"{type(exc).__name__}: {exc}"
