"""The fleet page in a real browser (headless Chromium, tests/hub/browser.py): a real hub,
two real nodes (cellwatch.node, in-process, OpenVINO), the real broker. The page must
update by itself: a marker set on the open page's window survives every check, so
no reload happened."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from cellwatch.hub.client import HubClient
from cellwatch.node.service import NodeService
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.states import Tone, UpdateState
from tests import images
from tests.broker import REPO, Broker, free_port
from tests.harness import Requester, wait_for
from tests.helpers.fleetpage import HOSTILE, send_telemetry, telemetry
from tests.helpers.nodes import node_settings
from tests.helpers.rollouts import hub_sees, ref
from tests.hub.browser import start_chromium, wait_until
from tests.hub.conftest import Bundles, HubFactory, NodeMaker

MARKER = "window.__cellwatchMarker"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = start_chromium(tmp_path / "chromium-profile", tmp_path / "chromedriver.log")
    yield driver
    driver.quit()


@pytest.fixture
def real_nodes(broker: Broker, bundles: Bundles, tmp_path: Path) -> Iterator[list[NodeService]]:
    nodes = []
    for node_id in ("node-1", "node-2"):
        settings = node_settings(
            broker,
            (bundles.v1, bundles.keys),
            node_id,
            tags=["ward-a"],
            updates={"store_dir": tmp_path / node_id},
        )
        node = NodeService(settings)
        node.start()
        nodes.append(node)
    yield nodes
    for node in nodes:
        if node.mqtt.connected:
            node.join()


# The page swaps its live part every second: read it in one script (atomic in the
# page's thread), never through element handles that the next swap makes stale.


def row_states(driver: webdriver.Chrome) -> dict[str, str]:
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('tr[data-node]'))"
        ".map(r => [r.dataset.node, r.dataset.state]);"
    )
    return {node: state for node, state in rows}


def cell_texts(driver: webdriver.Chrome, node_id: str) -> list[str]:
    cells: list[str] = driver.execute_script(
        "const row = Array.from(document.querySelectorAll('tr[data-node]'))"
        ".find(r => r.dataset.node === arguments[0]);"
        "return row ? Array.from(row.cells).map(td => td.innerText.trim()) : [];",
        node_id,
    )
    return cells


def texts(driver: webdriver.Chrome, css: str) -> list[str]:
    found: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => (e.innerText === undefined ? e.textContent : e.innerText).trim());",
        css,
    )
    return found


def rollout_on_page(driver: webdriver.Chrome, rollout_id: str) -> tuple[str, str] | None:
    """(data-state, data-active) of the rollout's article, or None."""
    found = driver.execute_script(
        "const a = Array.from(document.querySelectorAll('article[data-rollout]'))"
        ".find(e => e.dataset.rollout === arguments[0]);"
        "return a ? [a.dataset.state, a.dataset.active] : null;",
        rollout_id,
    )
    return (found[0], found[1]) if found else None


def same_page(driver: webdriver.Chrome) -> bool:
    return driver.execute_script(f"return {MARKER} === 'set before';") is True


class Traffic:
    """A lab client sending an image every 0.1 s until stopped."""

    def __init__(self, broker: Broker) -> None:
        self.requester = Requester(broker.settings("client"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.requester.send(images.jpeg())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.requester.close()


def test_fleet_page_follows_nodes_and_a_rollout_live(
    broker: Broker,
    hub_factory: HubFactory,
    operator: HubClient,
    bundles: Bundles,
    real_nodes: list[NodeService],
    fake_nodes: NodeMaker,
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    port = free_port()
    hub = hub_factory(http={"listen": f"127.0.0.1:{port}"})
    # node-3: a scripted node the test moves through the rollout by hand
    third = fake_nodes("node-3", model=ref(bundles), tags=("ward-a",), behaviour="manual")
    send_telemetry(third, telemetry("node-3", model_version="1.0.0").to_json())
    hub_sees(operator, ["node-1", "node-2", "node-3"])
    operator.push(bundles.v1)
    operator.push(bundles.v2)
    traffic = Traffic(broker)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        browser.execute_script(f"{MARKER} = 'set before';")

        # the node rows: online on toy 1.0.0, with the figures of their telemetry
        wait_until(
            browser,
            lambda d: row_states(d) == {"node-1": "online", "node-2": "online", "node-3": "online"},
            "three online rows",
        )
        wait_until(
            browser,
            lambda d: all(cell_texts(d, n)[4] not in ("–", "0.0") for n in ("node-1", "node-2")),
            "the real nodes' throughput",
        )
        cells = cell_texts(browser, "node-1")
        assert cells[0].startswith("node-1") and "ward-a" in cells[0]
        assert cells[2] == "toy 1.0.0" and cells[3] == "CPU"

        # a rollout: its progress changes on the open page
        rid = operator.rollout_start(
            RolloutStartArgs(name="toy", version="2.0.0", target="group:ward-a", waves="1,100%")
        ).rollout_id
        labels = f'article[data-rollout="{rid}"] .wlabel'
        wait_until(
            browser,
            lambda d: rollout_on_page(d, rid) == ("running", "2"),
            "2 of 3 active, node-3 pending",
        )
        assert texts(browser, labels) == ["1 node: 1 active", "2 nodes: 1 pending, 1 active"]
        wait_for(lambda: len(third.desired) == 1, what="node-3's desired")
        third.report(third.desired[0], UpdateState.ACTIVE, 1.0)
        wait_until(browser, lambda d: rollout_on_page(d, rid) == ("completed", "3"), "completed")
        assert texts(browser, labels) == ["1 node: 1 active", "2 nodes: 2 active"]
        wait_until(
            browser,
            lambda d: (
                [cell_texts(d, n)[2] for n in ("node-1", "node-2", "node-3")] == ["toy 2.0.0"] * 3
            ),
            "every node on 2.0.0",
        )
        assert same_page(browser), "the page was reloaded"
        wait_until(browser, lambda d: len(texts(d, "svg.spark polyline")) >= 2, "sparklines")
        shot = tmp_path / "fleet.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        traffic.stop()

    # a hostile tag (a real node cannot send one) is text on the page; nothing ran
    third.tags.append(HOSTILE)
    third.publish_status()
    tag_css = 'tr[data-node="node-3"] .tag'
    wait_until(browser, lambda d: texts(d, tag_css) == ["ward-a", HOSTILE], "the hostile tag")
    assert browser.execute_script("return window.pwned === undefined;") is True
    assert texts(browser, "main script, main img") == []

    # a node stops: its row turns offline
    real_nodes[1].join()
    wait_until(browser, lambda d: row_states(d).get("node-2") == "offline", "node-2 offline")
    assert row_states(browser)["node-1"] == "online"
    assert same_page(browser)

    # the hub restarts while the page is open: it says so, then recovers by itself
    hub.stop()
    hub.join()
    banner = browser.find_element(By.ID, "conn")  # outside the live part: never swapped
    wait_until(browser, lambda d: banner.is_displayed(), "the unreachable banner")
    assert "hub unreachable" in banner.text
    hub_factory(http={"listen": f"127.0.0.1:{port}"})
    wait_until(browser, lambda d: not banner.is_displayed(), "the page reconnects")
    wait_until(browser, lambda d: row_states(d).get("node-1") == "online", "rows after restart")
    assert same_page(browser)

    # the node's and the rollout's pages
    browser.get(f"http://127.0.0.1:{port}/nodes/node-1")
    wait_until(browser, lambda d: texts(d, "svg.spark.big polyline"), "sparklines")
    assert texts(browser, "h1")[0].startswith("node-1")
    browser.get(f"http://127.0.0.1:{port}/rollouts/{rid}")
    events = texts(browser, "ol.events li")
    assert any(e.endswith("completed: 3 of 3 nodes active") for e in events), events


def test_every_badge_is_readable_wherever_the_page_puts_it(
    browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """A badge of each tone, in the places the page puts badges (a rollout's head line,
    the shadow card's line, a table cell), styled by the page's own stylesheet: its
    text's colour is never its background's (a red 'aborted' on red was unreadable)."""
    css = (REPO / "hub" / "web" / "static" / "fleet.css").as_uri()
    badges = "".join(f'<span class="badge {t.value}">{t.value}</span>' for t in Tone)
    page = tmp_path / "badges.html"
    page.write_text(
        f'<link rel="stylesheet" href="{css}"><main>'
        f'<article class="rollout"><h3>{badges}</h3>'
        f'<span class="slabel">{badges}</span></article>'
        f"<table><tr><td>{badges}</td></tr></table></main>"
    )
    browser.get(page.as_uri())
    seen = browser.execute_script(
        "return Array.from(document.querySelectorAll('.badge')).map(b => {"
        "  const s = getComputedStyle(b); return [b.textContent, s.color, s.backgroundColor]; });"
    )
    assert len(seen) == 3 * len(Tone)
    same = [tone for tone, color, background in seen if color == background]
    assert same == [], f"badges whose text is the colour of their background: {same}"
