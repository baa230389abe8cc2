"""bench/chaos.py's scenarios as tests: real processes (broker, hub, two supervised
node processes, the lab client), steady load, one fault each; the caller must get
every image answered exactly once. Timers are shorter than production's
(bench.chaos.TEST_TIMERS) so each scenario is bounded to seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import SCENARIOS, TEST_TIMERS, Fleet, Row, run

IMAGES = 30
EXPECTED_RESTARTS = {
    "kill9": {1},  # the killed node, by the supervisor
    "poison": {2},  # the first try and the one retry
    "duplicate_id": {0, 1},  # 1 if the supervised node-1 (not the stray copy) gave up
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    running = Fleet(Path(tmp_path_factory.mktemp("chaos")), TEST_TIMERS)
    try:
        running.start()
        yield running
    finally:
        running.close()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_loses_and_duplicates_nothing(fleet: Fleet, name: str) -> None:
    row: Row = run(fleet, name, IMAGES)
    assert not row.failures, row.checks
    assert row.lost == 0, row
    assert row.duplicates == 0, row
    assert row.sent == row.answered >= IMAGES, row
    assert row.restarts in EXPECTED_RESTARTS.get(name, {0}), row
    if name == "device_error":
        assert row.errors["device_error"] >= 2, row.errors  # answered, then recompiled
    else:
        assert sum(row.errors.values()) == (1 if name == "poison" else 0), row.errors
