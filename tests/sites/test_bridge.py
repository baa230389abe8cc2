"""A site's bridge through real Mosquitto brokers on loopback ports: its account on the
central broker, what crosses, and what a broken link does to it (DESIGN.md, Sites)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.harness import Collector, T, wait_for
from tests.sites.topology import Site, central_broker, make_site, spy

NODES = ("node-1", "node-2")


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Broker]:
    # node-2 is at the site, but the central broker's ACL does not list it for the
    # site's bridge: what the bridge forwards for it is refused there.
    broker = central_broker(tmp_path / "central", {"lab-a": ["node-1"]})
    try:
        yield broker
    finally:
        broker.close_clients()
        broker.stop()


@pytest.fixture
def site(tmp_path: Path, central: Broker) -> Iterator[Site]:
    s = make_site(tmp_path / "lab-a", central, "lab-a", NODES)
    try:
        yield s
    finally:
        s.stop()


def link_is(collector: Collector, payload: bytes) -> bool:
    msgs = collector.on(T.site_link("lab-a"))
    return bool(msgs) and msgs[-1].payload == payload


def test_the_bridge_forwards_only_its_own_nodes_and_queues_while_the_link_is_down(
    central: Broker, site: Site
) -> None:
    seen = spy(central)
    try:
        wait_for(lambda: link_is(seen, b"1"), 15, "the bridge's link notification")
        nodes = {n: site.broker.connect(n) for n in NODES}
        for n, client in nodes.items():
            client.publish_wait(T.status(n), b'{"s":1}', qos=1, retain=True)
        nodes["node-1"].publish_wait(T.update("node-1"), b"u0", qos=1)
        wait_for(lambda: bool(seen.on(T.update("node-1"))), 10, "node-1's report at the centre")
        assert seen.on(T.status("node-1"))
        # node-2's messages crossed the bridge, and the central broker refused them.
        assert not seen.on(T.status("node-2"))

        site.link.down()
        wait_for(lambda: link_is(seen, b"0"), 10, "the bridge's Will at the centre")
        for i in range(1, 6):  # reports while the link is down wait at the site
            nodes["node-1"].publish_wait(T.update("node-1"), f"u{i}".encode(), qos=1)
        nodes["node-1"].publish_wait(T.status("node-1"), b'{"s":2}', qos=1, retain=True)
        site.link.up()
        wait_for(lambda: len(seen.on(T.update("node-1"))) == 6, 20, "the queued reports")
        assert [m.payload for m in seen.on(T.update("node-1"))] == [
            f"u{i}".encode() for i in range(6)
        ]
        wait_for(lambda: seen.on(T.status("node-1"))[-1].payload == b'{"s":2}', 10, "status")
        assert link_is(seen, b"1")
    finally:
        seen.close()


def test_a_bridge_with_a_wrong_password_is_refused_with_a_clear_log_line(
    tmp_path: Path, central: Broker
) -> None:
    seen = spy(central)
    site = make_site(tmp_path / "lab-a", central, "lab-a", NODES, password="not-its-password")
    try:
        # The site's log names the bridge, then the refusal (Mosquitto 2.0.11's words);
        # the central broker's says it refused a login.
        wait_for(
            lambda: "Connection Refused: Not authorized" in site.broker.log_text(),
            15,
            "the site broker's log line",
        )
        lines = site.broker.log_text().splitlines()
        refused = next(i for i, line in enumerate(lines) if "Connection Refused" in line)
        bridging = [line for line in lines[:refused] if "Connecting bridge" in line]
        assert "Connecting bridge (step 2) cellwatch-lab-a" in bridging[-1], lines
        assert "disconnected, not authorised" in central.log_text()
        node = site.broker.connect("node-1")
        node.publish_wait(T.status("node-1"), b"{}", qos=1, retain=True)
        assert not seen.on(T.status("node-1"))
        assert not seen.on(T.site_link("lab-a"))
    finally:
        seen.close()
        site.stop()
