"""Field samples without a broker: the keeper's choice of reason (the shadow
scorer's disagreement, the bundle's band, the random share) and the limits per rolling
hour and day (an injected clock); retention on the node and the hub."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from cellwatch.hub.db import Database
from cellwatch.hub.samples import SampleStore
from cellwatch.node.config import ReasonLimits, SamplesSettings
from cellwatch.node.decode import ImageLimits
from cellwatch.node.engine import ServingModel
from cellwatch.node.samples import (
    DAY_S,
    HOUR_S,
    ReasonLimiter,
    SampleKeeper,
    encode_png,
)
from cellwatch.node.spool import Spool
from cellwatch.shared.samples import SampleReason, SampleRow, sample_id
from tests.helpers.shadow import observation, serving
from tests.images import BLUE, RED, png


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ServingModel:
    from tests.models import write_test_bundle

    root = tmp_path_factory.mktemp("sel")
    return serving(write_test_bundle(root / "b", root / "k"), root / "k")


def keeper(tmp_path: Path, **over: object) -> SampleKeeper:
    settings = SamplesSettings.model_validate({"enabled": True, "sources": ["client"], **over})
    spool = Spool(tmp_path / "spool", 10**9, DAY_S, "node-t")
    k = SampleKeeper(settings, node_id="node-t", spool=spool, limits=ImageLimits(), clock=lambda: 0)
    k.start()
    return k


def write_all(k: SampleKeeper) -> list[SampleReason]:
    writer = threading.Thread(target=k.run)
    writer.start()
    assert k.flush()
    k.close()
    writer.join()
    return sorted(s.row.reason for s in k.spool.pending())


def test_the_shadow_candidates_disagreement_is_a_reason(toy: ServingModel, tmp_path: Path) -> None:
    k = keeper(tmp_path, low_confidence=True)
    red, blue = observation(toy, png(RED), 0), observation(toy, png(BLUE), 1)
    assert not red.result.low_confidence and not blue.result.low_confidence
    k.on_disagreement(red)  # the scorer, on the same thread, right before
    k.observe(red, lambda: 0)
    k.observe(blue, lambda: 0)  # no disagreement, confident: not kept
    assert write_all(k) == [SampleReason.DISAGREEMENT]


def test_disagreement_off_keeps_none(toy: ServingModel, tmp_path: Path) -> None:
    k = keeper(tmp_path, disagreement=False)
    red = observation(toy, png(RED), 0)
    k.on_disagreement(red)
    k.observe(red, lambda: 0)
    assert write_all(k) == []


def test_limits_per_rolling_hour_and_day() -> None:
    limiter = ReasonLimiter(
        ReasonLimits(random=2, low_confidence=1), ReasonLimits(random=3, low_confidence=5)
    )
    r, lc = SampleReason.RANDOM, SampleReason.LOW_CONFIDENCE
    assert [limiter.take(r, t) for t in (0, 1, 2)] == [True, True, False]  # 2 an hour
    assert limiter.take(lc, 3)  # each reason its own
    assert not limiter.take(lc, 4)
    assert not limiter.take(SampleReason.DISAGREEMENT, 5)  # a limit of 0: none
    assert limiter.take(r, HOUR_S + 1)  # the first left the hour
    assert not limiter.take(r, 2 * HOUR_S + 10)  # 3 in the day
    assert limiter.take(r, DAY_S + 0.5)  # the first left the day


def _row(data: bytes, when: datetime) -> SampleRow:
    return SampleRow(
        id=sample_id(data),
        source="client",
        node="node-t",
        model="toy@1.0.0",
        p_all=0.5,
        predicted="ALL",
        reason=SampleReason.RANDOM,
        collected_at=when,
    )


def test_retention_deletes_old_samples_on_the_node_and_the_hub(tmp_path: Path) -> None:
    now = datetime(2026, 12, 5, tzinfo=UTC)
    old, new = encode_png(np.zeros((4, 4, 3), np.uint8)), encode_png(np.ones((4, 4, 3), np.uint8))
    spool = Spool(tmp_path / "spool", 10**9, 14 * DAY_S, "node-t")
    spool.scan(now.timestamp())
    spool.put(old, _row(old, now - timedelta(days=15)))
    spool.put(new, _row(new, now - timedelta(days=13)))
    restarted = Spool(tmp_path / "spool", 10**9, 14 * DAY_S, "node-t")
    assert [r.id for r in restarted.scan(now.timestamp())] == [sample_id(new)]
    assert restarted.lost == {"expired": 1}
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == sorted(
        [f"{sample_id(new)}.png", f"{sample_id(new)}.json"]
    )

    db = Database(tmp_path / "hub.db")
    store = SampleStore(db, tmp_path / "hub-samples", 10**9, 180 * DAY_S)
    for data, age in ((old, 181), (new, 179)):
        row = _row(data, now - timedelta(days=age))
        store.path(row.id).write_bytes(data)
        db.add_sample(row, len(data), now.timestamp())
    assert store.expire(now.timestamp()) == 1
    assert [r.id for r in db.samples()] == [sample_id(new)]
    assert sorted(p.name for p in store.root.glob("*.png")) == [f"{sample_id(new)}.png"]
    db.close()


def test_a_full_writer_queue_drops_and_counts_never_waits(
    toy: ServingModel, tmp_path: Path
) -> None:
    """The observer thread hands chosen images over; with the writer busy (not running
    here) and its queue full, the next ones are dropped and counted at once."""
    k = keeper(tmp_path, random_share=1.0, queue=1)
    for i, colour in enumerate((RED, BLUE, RED)):
        k.observe(observation(toy, png(colour), i), lambda: 0)
    assert k.figures().dropped == {"queue": 2}
    assert write_all(k) == [SampleReason.RANDOM]
