"""The shadow phase through real processes (issue 19): a hub (`cellwatch-hub serve`) and
nodes (`cellwatch-node run`) on the project's Mosquitto. A candidate that disagrees
with the serving model aborts itself with its reason; one that agrees promotes itself
and rolls out; neither changes a live Result. A candidate a node cannot load beside
its model fails the phase with a code, and the serving model answers on. A node killed
during the phase resumes it, a restarted hub keeps the evidence, and a window sent
twice counts once; reports for an unknown rollout or from a node outside the target are
refused and counted."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.shared.hubapi import RolloutInfo, RolloutStartArgs, ShadowInfo
from cellwatch.shared.schemas import Result, ShadowReport, ShadowWindow, utcnow
from cellwatch.shared.states import RolloutState, ShadowState, UpdateState
from cellwatch.shared.topics import Topics
from tests.broker import Broker
from tests.harness import Requester, wait_for
from tests.helpers.hubcli import cli
from tests.helpers.rollouts import hub_sees, until
from tests.helpers.shadow import smears
from tests.hub.web import get, sample, scrape
from tests.models import write_test_bundle
from tests.security.stack import Process, Stack

T = Topics()
NODES = ("node-1", "node-2")
FAST = "[shadow]\nwindow_s = 0.5\n"
"""Nodes close a shadow window at every telemetry (each second)."""


@dataclass(frozen=True)
class Candidates:
    keys: Path
    v1: Path
    agrees: Path
    """toy 2.0.0: the serving model's weights, so every label agrees."""
    disagrees: Path
    """toy 9.0.0: its two outputs swapped, so no label agrees."""


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory) -> Candidates:
    root = tmp_path_factory.mktemp("shadow-bundles")
    keys = root / "keys"
    return Candidates(
        keys,
        write_test_bundle(root / "v1", keys, version="1.0.0"),
        write_test_bundle(root / "agrees", keys, version="2.0.0"),
        write_test_bundle(root / "disagrees", keys, version="9.0.0", swap_labels=True),
    )


@dataclass
class Fleet:
    stack: Stack
    hub: Process
    nodes: dict[str, Process]
    operator: HubClient
    requester: Requester

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.http_port}/"


@pytest.fixture
def fleet_of(
    broker: Broker, candidates: Candidates, tmp_path: Path
) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(
        extra: dict[str, str] | None = None, env: dict[str, dict[str, str]] | None = None
    ) -> Fleet:
        stack = Stack(tmp_path / "stack", broker, candidates.v1, candidates.keys)
        stack.work.mkdir()
        hub = stack.hub(tmp_path / "hub-data")
        hub.start()
        serving(hub)
        nodes = {
            n: stack.node(
                n,
                tmp_path / f"store-{n}",
                extra=FAST + (extra or {}).get(n, ""),
                env=(env or {}).get(n),
            )
            for n in NODES
        }
        for p in nodes.values():
            p.start()
        operator = HubClient(broker.settings("operator"), timeout_s=30.0)
        operator.connect()
        hub_sees(operator, list(NODES))
        f = Fleet(stack, hub, nodes, operator, Requester(broker.settings("client")))
        made.append(f)
        return f

    yield make
    for f in made:
        f.requester.close()
        f.operator.close()
        f.stack.stop()


def serving(hub: Process, starts: int = 1) -> None:
    """Until the hub process says it serves (its API requests are heard from then on)."""
    wait_for(lambda: hub.text().count("hub: serving") >= starts, 60, "the hub serving")


def shadow_start(f: Fleet, version: str, **kwargs: str) -> RolloutInfo:
    args = {"waves": "1,100%", "shadow": "100%", "promote_when": "agreement>=0.9,n>=20"}
    args.update(kwargs)
    info = f.operator.rollout_start(
        RolloutStartArgs.model_validate({"name": "toy", "version": version, **args})
    )
    assert info.state is RolloutState.SHADOWING and info.shadow is not None
    return info


class Live:
    """Images sent one at a time; every Result checked against the first answers."""

    def __init__(self, f: Fleet) -> None:
        self.f = f
        self.payloads = smears(12, seed=21)
        self.first: dict[int, Result] = {}
        self.sent = 0
        for i, p in enumerate(self.payloads):
            self.first[i] = self.f.requester.request(p, image_id=f"img-{i}")
        assert {r.model.version for r in self.first.values() if r.model} == {"1.0.0"}

    def until(
        self, rid: str, cond: Callable[[RolloutInfo], bool], timeout: float = 90
    ) -> RolloutInfo:
        """Send images until the rollout satisfies cond; a Result from the serving model
        must be its first answer, exactly."""
        seen: list[RolloutInfo] = []

        def check() -> bool:
            i = self.sent % len(self.payloads)
            r = self.f.requester.request(self.payloads[i], image_id=f"img-{i}")
            self.sent += 1
            assert r.status == "ok" and r.model is not None
            if r.model.version == "1.0.0":
                want = self.first[i]
                assert (r.label, r.probabilities) == (want.label, want.probabilities)
            seen.append(self.f.operator.rollout_status(rid))
            return cond(seen[-1])

        wait_for(check, timeout, f"rollout {rid}", every=0.0)
        return seen[-1]


def shadow_states(info: RolloutInfo) -> dict[str, ShadowState | None]:
    assert info.shadow is not None
    return {n.node_id: n.state for n in info.shadow.nodes}


def test_a_disagreeing_candidate_aborts_and_an_agreeing_one_promotes_itself(
    fleet_of: Callable[..., Fleet], candidates: Candidates, broker: Broker
) -> None:
    f = fleet_of()
    f.operator.push(candidates.disagrees)
    f.operator.push(candidates.agrees)
    live = Live(f)

    bad = shadow_start(f, "9.0.0")
    done = live.until(bad.rollout_id, lambda i: i.state is RolloutState.ABORTED)
    assert done.reason is not None and "disagrees with the serving model" in done.reason
    assert done.shadow is not None and done.shadow.agreement.k == 0
    assert done.shadow.agreement.n >= 20 and not done.shadow.open
    assert len(done.shadow.disagreements) > 0
    assert all(a != c for a, row in done.shadow.confusion.items() for c in row)
    stopped = until(
        f.operator,
        bad.rollout_id,
        lambda i: set(shadow_states(i).values()) == {ShadowState.STOPPED},
    )
    assert stopped.counts.get(UpdateState.ACTIVE, 0) == 0  # no node ever switched
    assert {n.model.version for n in f.operator.nodes().nodes if n.model} == {"1.0.0"}

    good = shadow_start(f, "2.0.0")
    promoted = live.until(good.rollout_id, lambda i: i.state is not RolloutState.SHADOWING)
    assert promoted.state in (RolloutState.RUNNING, RolloutState.COMPLETED), promoted.reason
    assert promoted.shadow is not None and promoted.shadow.outcome is not None
    assert promoted.shadow.outcome.startswith("promoted by its rule agreement>=0.9,n>=20")
    a = promoted.shadow.agreement
    assert a.ci95 is not None and a.ci95[0] >= 0.9 and a.n >= 20 and a.k == a.n
    assert promoted.shadow.latency.delta_p50 is not None
    finished = live.until(good.rollout_id, lambda i: i.state is RolloutState.COMPLETED)
    assert finished.counts.get(UpdateState.ACTIVE) == 2

    # the operator's views of it: --json, the page, /metrics, nodes --json
    proc = cli(broker, "rollout", "status", good.rollout_id, "--json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)["shadow"]
    assert shown["agreement"]["n"] == a.n and shown["agreement"]["ci95"] == list(a.ci95)
    table = cli(broker, "rollout", "status", good.rollout_id, timeout=30)
    assert "shadow phase" in table.stdout and "promoted by its rule" in table.stdout
    page = get(f.url, "/").text
    assert f'data-agreement-n="{a.n}"' in page and "shadow phase" in page
    metrics = scrape(f.url)
    scored = {
        dict(labels)["node_id"]: value
        for (name, labels), value in metrics.items()
        if name == "cellwatch_shadow_images_total" and dict(labels)["rollout_id"] == good.rollout_id
    }
    assert sum(scored.values()) == a.n and set(scored) <= set(NODES)
    drift = {n.node_id: n.drift for n in f.operator.nodes().nodes}
    assert all(d is not None and d.state == "no_reference" for d in drift.values())  # toy bundles
    for path in ("/", "/nodes/node-1"):  # the badge says so, on the fleet's and the node's page
        assert re.search(r'data-drift="no_reference"[^>]*>no reference<', get(f.url, path).text)


def test_a_candidate_that_cannot_be_loaded_beside_fails_the_phase_with_its_code(
    fleet_of: Callable[..., Fleet], candidates: Candidates
) -> None:
    f = fleet_of(
        extra={"node-2": "min_free_mb = 16000000\n"},  # more than any machine has free
        env={"node-1": {"CELLWATCH_TEST_FAULTS": "compile_raises_at=2"}},  # the candidate's
    )
    f.operator.push(candidates.agrees)
    live = Live(f)
    info = shadow_start(f, "2.0.0", max_failures="1")
    done = until(f.operator, info.rollout_id, lambda i: i.state is RolloutState.ABORTED, 60)
    assert done.reason is not None and "shadow phase failed: 2 of 2 nodes" in done.reason
    assert done.shadow is not None and done.shadow.failed == 2
    errors = {n.node_id: n.error for n in done.shadow.nodes}
    assert errors["node-1"] is not None and errors["node-1"].code == "compile_error"
    assert errors["node-2"] is not None and errors["node-2"].code == "insufficient_memory"
    assert "serving model is untouched" in errors["node-2"].message
    live.until(info.rollout_id, lambda i: live.sent >= 8)  # the serving model answers on
    page = get(f.url, "/").text
    assert "shadow insufficient_memory" in page and "shadow compile_error" in page


def test_restarts_keep_the_phase_and_each_window_counts_once(
    fleet_of: Callable[..., Fleet], candidates: Candidates, broker: Broker, tmp_path: Path
) -> None:
    f = fleet_of()
    f.operator.push(candidates.agrees)
    live = Live(f)
    info = shadow_start(f, "2.0.0", promote_when="agreement>=0.9,n>=100000")
    rid = info.rollout_id
    scored = live.until(rid, lambda i: i.shadow is not None and i.shadow.agreement.n >= 10).shadow
    assert scored is not None

    # node-1 killed mid-phase: it comes back shadowing (from its store, no download)
    log = f.nodes["node-1"]
    f.nodes["node-1"].kill()
    f.nodes["node-1"].start()
    wait_for(lambda: log.text().count("shadowing toy 2.0.0") >= 2, 60, "node-1 shadows again")
    restarted = log.text().split("shadowing toy 2.0.0")[-2]
    assert "is in the store, no download needed" in restarted
    before = f.operator.rollout_status(rid).shadow
    assert before is not None
    n1 = node_n(before, "node-1")
    live.until(rid, lambda i: i.shadow is not None and node_n(i.shadow, "node-1") > n1)

    # the hub restarted: the evidence is where it was
    evidence = f.operator.rollout_status(rid).shadow
    assert evidence is not None and evidence.agreement.n >= scored.agreement.n
    f.hub.stop()
    f.hub.start()
    serving(f.hub, starts=2)
    again = until(f.operator, rid, lambda i: i.shadow is not None, 60).shadow
    assert again is not None and again.agreement.n >= evidence.agreement.n

    # one window sent twice (a redelivery, a replay) counts once; strangers are refused
    f.nodes["node-2"].stop()  # its last window sent: node-2's evidence holds still
    settled = until(f.operator, rid, lambda i: shadow_states(i)["node-2"] is not None).shadow
    assert settled is not None
    n2 = node_n(settled, "node-2")
    node2, node3 = broker.connect("node-2"), broker.connect("node-3")
    now = utcnow()
    window = ShadowWindow(
        window_id="replayed-1", started_at=now, ended_at=now, n=5, agreements=5, skipped=0
    )

    def report(rollout_id: str) -> bytes:
        return ShadowReport(
            rollout_id=rollout_id,
            model=info.model,
            state=ShadowState.SHADOWING,
            window=window,
            ts=now,
        ).to_json()

    for sender, rollout_id, topic in (
        (node2, rid, T.shadow_report("node-2")),
        (node2, rid, T.shadow_report("node-2")),  # the same window again
        (node2, "r999", T.shadow_report("node-2")),  # no such rollout
        (node3, rid, T.shadow_report("node-3")),  # not one of its targets
    ):
        assert sender.publish_wait(topic, report(rollout_id))

    def dropped(reason: str) -> float:
        return sample(scrape(f.url), "cellwatch_hub_messages_dropped_total", reason=reason)

    wait_for(lambda: dropped("not_a_target") == 1, 30, "node-3's report refused")
    assert dropped("duplicate_window") == 1 and dropped("unknown_rollout") == 1
    after = f.operator.rollout_status(rid).shadow
    assert after is not None and node_n(after, "node-2") == n2 + 5

    # a window that comes while the hub's database is locked waits, and then counts
    locker = sqlite3.connect(tmp_path / "hub-data" / "hub.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        window = window.model_copy(update={"window_id": "while-locked-1", "n": 7, "agreements": 7})
        assert node2.publish_wait(T.shadow_report("node-2"), report(rid))
        wait_for(lambda: "cannot write the database" in f.hub.text(), 30, "the hub sees the lock")
        held = f.operator.rollout_status(rid).shadow  # a read is answered meanwhile
        assert held is not None and node_n(held, "node-2") == n2 + 5
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    def counted() -> int:
        shadow = f.operator.rollout_status(rid).shadow
        return node_n(shadow, "node-2") if shadow is not None else -1

    wait_for(lambda: counted() == n2 + 12, 60, "the window that waited counted")


def node_n(shadow: ShadowInfo, node_id: str) -> int:
    return next(n for n in shadow.nodes if n.node_id == node_id).agreement.n
