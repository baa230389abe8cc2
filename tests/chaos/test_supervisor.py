"""bench/supervisor.py: a scenario and the supervisor racing on one child never leave
two processes in its slot, and every exit is recorded once with its cause. Children
are `sleep` processes: cheap to start, so a few hundred rounds take seconds."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.supervisor import Cause, Child, Supervisor
from tests.harness import wait_for

ROUNDS = 300


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    # restart_s 0 and a 0.2 ms period: the supervisor looks at the child as often as it
    # can, so its check and a scenario's stop/start overlap in most rounds.
    sup = Supervisor(restart_s=0.0, period_s=0.0002)
    try:
        yield sup
    finally:
        sup.close()
        for child in sup.children:
            for proc in child.history:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def sleeper(tmp_path: Path, name: str = "node") -> Child:
    return Child(name, ["sleep", "120"], tmp_path / f"{name}.log", {})


def alive(child: Child) -> int:
    return sum(proc.poll() is None for proc in child.history)


def settle(child: Child, timeout: float = 10.0) -> None:
    """Until the supervisor has restarted whatever it is due to restart."""
    wait_for(lambda: child.running, timeout, f"{child.name} running again")


def test_a_scenario_restarting_a_node_never_races_the_supervisor_into_two(
    tmp_path: Path, supervisor: Supervisor
) -> None:
    """The chaos bench's sigterm shape, with the node dying on its own just before the
    scenario stops it: the supervisor sees that exit while the scenario stops and
    starts the node itself. One process may run afterwards, never two."""
    child = supervisor.add(sleeper(tmp_path))
    child.start()
    supervisor.begin()
    for i in range(ROUNDS):
        assert child.proc is not None
        child.proc.kill()  # dies on its own: the supervisor wants to restart it
        if i % 3:
            time.sleep(0.0001 * (i % 7))  # vary which side gets there first
        child.stop()
        child.start()
        settle(child)
        assert alive(child) == 1, f"round {i}: {alive(child)} processes in one slot"
    assert child.running
    # every process but the last one exited, and each exit was recorded exactly once
    assert len(child.exits) == len(child.history) - 1
    assert {e.cause for e in child.exits} <= {Cause.OWN, Cause.STOPPED}


def test_the_supervisor_restarts_a_signalled_child_once_and_counts_causes(
    tmp_path: Path, supervisor: Supervisor
) -> None:
    child = supervisor.add(sleeper(tmp_path))
    child.start()
    supervisor.begin()
    for _ in range(50):
        before = len(child.history)
        child.signal(signal.SIGKILL)
        # (the lambda runs within this round: B023's late binding cannot bite)
        wait_for(lambda: len(child.history) > before, 10, "the restart")  # noqa: B023
        settle(child)
        assert alive(child) == 1
    assert child.restarts == 50  # each restart follows a non-zero exit (-9)
    assert [e.cause for e in child.exits] == [Cause.SIGNALLED] * 50
    assert {e.signal for e in child.exits} == {signal.SIGKILL}


def test_a_child_killed_without_restart_stays_down_until_started(tmp_path: Path) -> None:
    child = sleeper(tmp_path)
    child.start()
    child.signal(signal.SIGKILL, restart=False)
    assert child.proc is not None
    child.proc.wait(10)
    for later in (0.0, 1.0, 1000.0):  # the supervisor's step, at any time after the exit
        child.supervise(time.monotonic() + later, restart_s=0.5)
    assert len(child.history) == 1 and not child.running
    child.start()
    try:
        assert alive(child) == 1 and len(child.history) == 2
        assert [(e.code, e.cause) for e in child.exits] == [(-9, Cause.SIGNALLED)]
    finally:
        child.stop(10)


def test_the_supervisor_waits_restart_s_after_an_exit(tmp_path: Path) -> None:
    child = sleeper(tmp_path)
    child.start()
    assert child.proc is not None
    child.proc.kill()
    child.proc.wait(10)
    now = time.monotonic()
    child.supervise(now, restart_s=5.0)  # sees the exit
    child.supervise(now + 4.9, restart_s=5.0)
    assert len(child.history) == 1
    child.supervise(now + 5.0, restart_s=5.0)
    try:
        assert len(child.history) == 2 and alive(child) == 1
        assert child.restarts == 1 and [e.cause for e in child.exits] == [Cause.OWN]
    finally:
        child.stop(10)


def test_start_refuses_a_second_process_for_a_running_slot(tmp_path: Path) -> None:
    child = sleeper(tmp_path)
    child.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            child.start()
        assert len(child.history) == 1
    finally:
        assert child.stop(10) == -signal.SIGTERM
    assert [(e.code, e.cause) for e in child.exits] == [(-signal.SIGTERM, Cause.STOPPED)]
