"""Two sites and a centre on one machine, every part a real process (DESIGN.md, Sites):
the central broker with the hub; site-a's broker with a relay and a node; site-b's
broker with a node and no relay. Each site's bridge reaches the centre through a Link
that counts the bytes crossing and can be cut.

The tests share one topology and run in order (each leaves it as the next expects):
a rollout reaches both sites and crosses each link once; a site keeps classifying with
its link down, and its part of a rollout waits and completes when the link returns;
the central broker restarting is the same case; the relay heals a tampered cache, and
a node refuses a relay that alters a bundle; a relay restarted mid-fetch resumes; two
relays share a site; a relay whose disk is full says so; and through all of it, no
image or Result reached the central broker.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cellwatch.client import Client, ClientSettings
from cellwatch.hub.client import HubClient
from cellwatch.hub.fetch import fetch_replies
from cellwatch.node.fetcher import FetchError
from cellwatch.shared.codes import ApiErrorCode, UpdateErrorCode
from cellwatch.shared.hubapi import RolloutInfo, RolloutStartArgs
from cellwatch.shared.manifest import MANIFEST_FILE, Manifest
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.rpc import Inbound, Route
from cellwatch.shared.rpc.edge import Edge
from cellwatch.shared.rpc.transfer import chunk_properties
from cellwatch.shared.schemas import FetchRequest, ModelRef, NodeStatus
from cellwatch.shared.states import NodeState, RolloutState, UpdateState
from tests import images
from tests.broker import Broker
from tests.harness import Collector, T, wait_for
from tests.helpers.rollouts import until
from tests.models import write_test_bundle
from tests.security.stack import Process
from tests.sites.topology import World, central_broker, fetch_bundle, make_site, spy, wait_hub

SIMS = ("node-a2", "node-a3", "node-a4", "node-a5")
"""Simulated nodes at site-a: the node's own Fetcher, in the test process."""
SITE_A = ["node-a1", *SIMS, "relay-a", "relay-a2"]
SITE_B = ["node-b1"]
VERSIONS = ("1.0.0", "2.0.0", "3.0.0", "4.0.0", "5.0.0", "6.0.0", "7.0.0")


@dataclass
class Env:
    world: World
    operator: HubClient
    spy: Collector
    bundles: dict[str, Path]
    procs: dict[str, Process] = field(default_factory=dict)

    @property
    def a(self) -> Broker:
        return self.world.sites["site-a"].broker

    @property
    def b(self) -> Broker:
        return self.world.sites["site-b"].broker

    def ref(self, version: str) -> ModelRef:
        data = (self.bundles[version] / MANIFEST_FILE).read_bytes()
        return ModelRef(name="toy", version=version, manifest_sha256=sha(data))

    def manifest(self, version: str) -> Manifest:
        return Manifest.model_validate_json((self.bundles[version] / MANIFEST_FILE).read_bytes())

    def size(self, version: str) -> int:
        return sum(p.stat().st_size for p in self.bundles[version].iterdir())

    def rollout(self, version: str, target: str = "all") -> str:
        args = RolloutStartArgs(name="toy", version=version, target=target, waves="100%")
        return self.operator.rollout_start(args).rollout_id

    def status(self, node_id: str) -> NodeStatus | None:
        msgs = self.spy.on(T.status(node_id))
        return NodeStatus.model_validate_json(msgs[-1].payload) if msgs else None


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("sites")
    keys = root / "keys"
    bundles = {
        v: write_test_bundle(root / "bundles" / v, keys, version=v, seed=i)
        for i, v in enumerate(VERSIONS)
    }
    central = central_broker(root / "central", {"site-a": SITE_A, "site-b": SITE_B})
    world = World(root / "work", central, {}, bundles["1.0.0"], keys)
    world.work.mkdir()
    seen = spy(central)
    sites = []
    operator = None
    try:
        world.sites["site-a"] = make_site(
            root / "site-a", central, "site-a", ["node-a1", *SIMS], ["relay-a", "relay-a2"]
        )
        sites.append(world.sites["site-a"])
        world.sites["site-b"] = make_site(root / "site-b", central, "site-b", SITE_B)
        sites.append(world.sites["site-b"])
        env = Env(world, HubClient(central.settings("operator"), timeout_s=30), seen, bundles)
        operator = env.operator
        env.procs = {
            "hub": world.hub('[rollout]\nmax_failures = "100%"\nnode_timeout_s = 120\n'),
            "relay-a": world.relay("site-a", "relay-a"),
            "node-a1": world.node("site-a", "node-a1"),
            "node-b1": world.node("site-b", "node-b1"),
        }
        for p in env.procs.values():
            p.start()
        operator.connect()
        wait_hub(central)
        for v in VERSIONS[1:]:
            operator.push(bundles[v])
        wait_for(
            lambda: all(
                (s := env.status(n)) is not None and s.state == NodeState.ONLINE
                for n in ("node-a1", "node-b1")
            ),
            90,
            "both nodes online at the centre",
        )
        yield env
    finally:
        if operator is not None:
            operator.close()
        world.stop()
        seen.close()
        for s in sites:
            s.stop()
        central.close_clients()
        central.stop()


def completed(info: RolloutInfo) -> bool:
    return info.state is RolloutState.COMPLETED


def classify(broker: Broker, count: int, seed: int) -> tuple[int, int, int]:
    """(ok Results, images without one, duplicates dropped) of `count` images sent by the
    site's lab client."""
    colours = [(seed % 255, (seed * 7 + i) % 255, (i * 13) % 255) for i in range(count)]
    with Client(ClientSettings(mqtt=broker.settings("client"), timeout_s=60)) as client:
        answers = list(
            client.classify_many([images.jpeg(c, 64, 64) for c in colours], concurrency=8)
        )
        stats = client.stats()
    ok = sum(1 for a in answers if a.status == "ok")
    return ok, count - ok, stats.duplicates


def sim_fetch(env: Env, node_id: str, version: str, dest: Path, **kwargs: float) -> int:
    """A node at site-a fetches a whole bundle with the node's own Fetcher (through the
    relay); checks every file against the manifest; the bytes received."""
    return fetch_bundle(env.a, node_id, env.ref(version).manifest_sha256, dest, **kwargs)


def crossed(env: Env, site: str) -> int:
    """Bytes that came in over the site's link so far."""
    return env.world.sites[site].link.counts().from_central


# -- the tests, in order ------------------------------------------------------------------


def test_a_rollout_reaches_both_sites_and_each_bundle_crosses_each_link_once(env: Env) -> None:
    before = {s: crossed(env, s) for s in ("site-a", "site-b")}
    rid = env.rollout("2.0.0")
    until(env.operator, rid, completed, 120)
    size = env.size("2.0.0")
    for s in ("site-a", "site-b"):
        got = crossed(env, s) - before[s]
        assert size <= got < 1.3 * size, (s, got, size)
    ok, missing, duplicates = classify(env.a, 10, seed=1)
    assert (ok, missing, duplicates) == (10, 0, 0)
    nodes = {n.node_id: n for n in env.operator.nodes().nodes}
    assert nodes["node-a1"].site == "site-a" and nodes["node-b1"].site == "site-b"
    assert {s.site: s.link_up for s in env.operator.nodes().sites} == {
        "site-a": True,
        "site-b": True,
    }


def test_a_site_keeps_classifying_and_its_rollout_waits_while_its_link_is_down(env: Env) -> None:
    link = env.world.sites["site-b"].link
    link.down()
    try:
        wait_for(
            lambda: (
                {n.node_id: n.state for n in env.operator.nodes().nodes}.get("node-b1")
                == NodeState.UNREACHABLE
            ),
            30,
            "the hub to show node-b1 unreachable",
        )
        assert {s.site: s.link_up for s in env.operator.nodes().sites}["site-b"] is False
        rid = env.rollout("3.0.0")
        # The site classifies on: nothing lost, nothing duplicated to the caller.
        assert classify(env.b, 20, seed=2) == (20, 0, 0)
        info = until(env.operator, rid, lambda i: _state(i, "node-a1") is UpdateState.ACTIVE, 60)
        assert info.state is RolloutState.RUNNING
        assert _state(info, "node-b1") in (UpdateState.PENDING, UpdateState.WAITING)
    finally:
        link.up()
    info = until(env.operator, rid, completed, 120)
    assert _state(info, "node-b1") is UpdateState.ACTIVE
    hub_log = env.procs["hub"].text()
    assert "node node-b1: its site is unreachable: its clock stops" in hub_log or (
        "site site-b: link to the central broker DOWN" in hub_log
    )
    assert "node node-b1 timed out" not in hub_log
    wait_for(
        lambda: (
            {n.node_id: n.state for n in env.operator.nodes().nodes}["node-b1"] == NodeState.ONLINE
        ),
        30,
        "node-b1 online again at the hub",
    )


def _state(info: RolloutInfo, node_id: str) -> UpdateState:
    return next(t.state for t in info.targets if t.node_id == node_id)


def test_the_central_broker_restarting_is_the_same_case(env: Env) -> None:
    central = env.world.central
    central.stop()
    try:
        assert classify(env.a, 10, seed=3) == (10, 0, 0)
        assert classify(env.b, 10, seed=4) == (10, 0, 0)
    finally:
        central.start()
    wait_for(
        lambda: [s.link_up for s in env.operator.nodes().sites] == [True, True],
        60,
        "both sites linked again",
    )
    rid = env.rollout("2.0.0")  # back: no download, from each node's store
    until(env.operator, rid, completed, 120)


def test_the_relay_heals_a_tampered_cache(env: Env, tmp_path: Path) -> None:
    ref = env.ref("3.0.0")
    cached = env.world.cache_dir("relay-a") / "bundles" / ref.manifest_sha256 / "model.bin"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))  # same size, another hash
    before = crossed(env, "site-a")
    sim_fetch(env, "node-a2", "3.0.0", tmp_path / "a2")  # checks every file's hash
    refetched = crossed(env, "site-a") - before
    assert refetched >= env.manifest("3.0.0").files["model.bin"].size
    assert "model.bin of " + ref.manifest_sha256[:12] + " failed its check" in (
        env.procs["relay-a"].text()
    )
    assert sha(cached.read_bytes()) == env.manifest("3.0.0").files["model.bin"].sha256


def test_a_node_refuses_a_bundle_a_relay_altered(env: Env) -> None:
    """A relay that serves altered bytes (its own chunk hashes fit them): the node checks
    the file against the signed manifest, refuses it and keeps serving its model."""
    env.procs["relay-a"].stop()
    evil = EvilRelay(env.a, env.bundles["4.0.0"])
    try:
        rid = env.rollout("4.0.0", target="node:node-a1")
        info = until(env.operator, rid, lambda i: i.state is not RolloutState.RUNNING, 120)
        target = info.targets[0]
        assert target.state is UpdateState.FAILED and target.error is not None
        assert target.error.code is UpdateErrorCode.HASH_MISMATCH, target.error
        assert evil.altered > 0
        status = env.status("node-a1")
        assert status is not None and status.model is not None
        assert status.model.version == "2.0.0"  # still serving what it had
    finally:
        evil.close()
        env.procs["relay-a"].start()
    rid = env.rollout("4.0.0", target="node:node-a1")
    until(env.operator, rid, completed, 120)


class EvilRelay:
    """Answers site-a's fetch requests as relay-a, with model.bin's bytes altered."""

    def __init__(self, broker: Broker, bundle: Path) -> None:
        self.bundle = bundle
        self.altered = 0
        self.mqtt = MqttClient(broker.settings("relay-a"), client_id="evil-relay", clean_start=True)
        Edge(self.mqtt).add(
            Route(
                T.hub_fetch_filter(),
                FetchRequest.model_validate_json,
                self.answer,
                max_bytes=4096,
                reply=fetch_replies(T),
            )
        )
        self.mqtt.connect()

    def answer(self, inbound: Inbound[FetchRequest]) -> None:
        req = inbound.body
        data = (self.bundle / req.file).read_bytes()
        total = len(data)
        chunk = bytearray(data[req.offset : req.offset + min(req.length, 256 * 1024)])
        if req.file == "model.bin" and chunk:
            chunk[0] ^= 0xFF
            self.altered += 1
        inbound.reply(bytes(chunk), user=chunk_properties(req.offset, bytes(chunk), total))

    def close(self) -> None:
        self.mqtt.disconnect()


def test_a_relay_restarted_mid_fetch_resumes(env: Env, tmp_path: Path) -> None:
    link = env.world.sites["site-a"].link
    ref = env.ref("5.0.0")
    files = env.manifest("5.0.0").files
    big = max(files, key=lambda name: files[name].size)  # the toy's golden.npz, 3 MB
    size = files[big].size
    part = env.world.cache_dir("relay-a") / "incoming" / ref.manifest_sha256 / f"{big}.part"
    before = crossed(env, "site-a")
    link.rate_bytes_s = size / 4  # about 4 s for it
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            sim_fetch(env, "node-a3", "5.0.0", tmp_path / "a3")
        except BaseException as exc:
            errors.append(exc)

    fetching = threading.Thread(target=fetch)
    fetching.start()
    try:
        wait_for(lambda: part.exists() and part.stat().st_size > size * 0.6, 60, "a part file")
        relay = env.procs["relay-a"]
        assert relay.proc is not None
        relay.proc.kill()  # SIGKILL mid-fetch
        relay.proc.wait()
        had = part.stat().st_size
        link.rate_bytes_s = 0.0
        relay.start()
        fetching.join(120)
    finally:
        link.rate_bytes_s = 0.0
        fetching.join(120)
    assert not errors, errors
    # The bundle crossed once, plus at most the chunks in flight when the relay died
    # (answered after it, or lost with it); without the resume, the `had` bytes of the
    # part file would have crossed again on top.
    in_flight = 4 * 256 * 1024 + 64 * 1024  # the relay's window of chunks, and headers
    assert had > in_flight, "killed too early for the test to tell"
    got = crossed(env, "site-a") - before
    assert got < env.size("5.0.0") + in_flight, (got, env.size("5.0.0"), had)
    assert f"resuming {big} of {ref.manifest_sha256[:12]}" in env.procs["relay-a"].text()


def test_two_relays_share_a_site(env: Env, tmp_path: Path) -> None:
    second = env.world.relay("site-a", "relay-a2")
    second.start()
    try:
        wait_for(lambda: "serving its site's fetch requests" in second.text(), 30, "relay-a2")
        before = crossed(env, "site-a")
        errors: list[BaseException] = []

        def fetch(node_id: str) -> None:
            try:
                sim_fetch(env, node_id, "6.0.0", tmp_path / node_id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(n,)) for n in SIMS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        got = crossed(env, "site-a") - before
        size = env.size("6.0.0")
        assert size <= got < 2.3 * size, (got, size)  # each relay fetches it at most once
        cached = f"bundle {env.ref('6.0.0').manifest_sha256[:12]} cached"
        assert cached in second.text() or cached in env.procs["relay-a"].text()
    finally:
        second.stop()


def test_a_relay_whose_disk_is_full_says_so_and_recovers(env: Env, tmp_path: Path) -> None:
    ref = env.ref("7.0.0")
    incoming = env.world.cache_dir("relay-a") / "incoming" / ref.manifest_sha256
    incoming.mkdir(parents=True)
    (incoming / "model.bin.part").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(FetchError) as refused:
        sim_fetch(env, "node-a4", "7.0.0", tmp_path / "first")
    assert refused.value.code == ApiErrorCode.UNAVAILABLE
    assert "No space left on device" in str(refused.value)
    sim_fetch(env, "node-a4", "7.0.0", tmp_path / "again")  # the next try has room


def test_no_image_or_result_reached_the_central_broker(env: Env) -> None:
    topics = {m.topic for m in env.spy.messages}
    assert any(t.endswith("/status") for t in topics)
    assert any(t.endswith("/telemetry") for t in topics)
    assert any(t.endswith("/update") for t in topics)
    leaked = [
        t
        for t in topics
        if t.startswith(("cellwatch/images", "cellwatch/results", "cellwatch/replies"))
        or "/images" in t
    ]
    assert leaked == []
