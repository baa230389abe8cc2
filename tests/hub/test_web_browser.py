"""The fleet page in a real browser (headless Chromium, tests/hub/browser.py): a real hub,
two real nodes (cellwatch.node, in-process, OpenVINO), the real broker. The page must
update by itself: a marker set on the open page's window survives every check, so
no reload happened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from cellwatch.hub.client import HubClient
from cellwatch.node.service import NodeService
from cellwatch.shared.hubapi import RolloutStartArgs
from tests import images
from tests.broker import Broker, free_port
from tests.harness import Requester
from tests.hub.browser import start_chromium, wait_until
from tests.hub.conftest import Bundles, HubFactory, NodeMaker
from tests.hub.test_e2e import hub_sees
from tests.hub.test_web_page import HOSTILE
from tests.node.conftest import node_settings

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


def row_states(driver: webdriver.Chrome) -> dict[str, str]:
    """node id -> state of the real nodes' rows."""
    rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-node]")
    states = {r.get_attribute("data-node") or "": r.get_attribute("data-state") or "" for r in rows}
    return {k: v for k, v in states.items() if k != "node-3"}


def cell_texts(driver: webdriver.Chrome, node_id: str) -> list[str]:
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-node="{node_id}"]')
    return [td.text for td in row.find_elements(By.TAG_NAME, "td")]


def same_page(driver: webdriver.Chrome) -> bool:
    return driver.execute_script(f"return {MARKER} === 'set before';") is True


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
    rogue = fake_nodes("node-3", tags=("ward-c", HOSTILE))  # what a real node cannot send
    rogue.publish_status()
    hub_sees(operator, ["node-1", "node-2"])
    requester = Requester(broker.settings("client"))
    try:
        for _ in range(8):
            requester.request(images.jpeg())
    finally:
        requester.close()
    operator.push(bundles.v1)
    browser.get(f"http://127.0.0.1:{port}/")
    browser.execute_script(f"{MARKER} = 'set before';")

    # the node rows: both online on toy 1.0.0, with their figures
    wait_until(
        browser,
        lambda d: row_states(d) == {"node-1": "online", "node-2": "online"},
        "two online rows",
    )
    wait_until(browser, lambda d: cell_texts(d, "node-1")[4] not in ("–", ""), "telemetry")
    cells = cell_texts(browser, "node-1")
    assert cells[0].startswith("node-1") and "ward-a" in cells[0]
    assert cells[2] == "toy 1.0.0" and cells[3] == "CPU"
    # a hostile tag is text on the page, and nothing it carries ran
    wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-node="node-3"]'), "3")
    tags = browser.find_elements(By.CSS_SELECTOR, 'tr[data-node="node-3"] .tag')
    assert [t.text for t in tags] == ["ward-c", HOSTILE]
    assert browser.execute_script("return window.pwned === undefined;") is True
    assert len(browser.find_elements(By.CSS_SELECTOR, "main script, main img")) == 0

    # a rollout: the wave progress changes on the open page
    operator.push(bundles.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", target="group:ward-a", waves="1,100%")
    ).rollout_id
    article = f'article[data-rollout="{rid}"]'
    wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, article), "the rollout appears")
    wait_until(
        browser,
        lambda d: (
            d.find_element(By.CSS_SELECTOR, article).get_attribute("data-state") == "completed"
        ),
        "the rollout completes on the page",
    )
    element = browser.find_element(By.CSS_SELECTOR, article)
    assert element.get_attribute("data-active") == "2"
    waves = [w.text for w in element.find_elements(By.CSS_SELECTOR, ".wlabel")]
    assert waves == ["1 node: 1 active", "1 node: 1 active"]
    wait_until(
        browser,
        lambda d: (
            [c[2] for c in (cell_texts(d, "node-1"), cell_texts(d, "node-2"))]
            == ["toy 2.0.0", "toy 2.0.0"]
        ),
        "both nodes on 2.0.0",
    )
    assert same_page(browser), "the page was reloaded"
    shot = tmp_path / "fleet.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    # a node stops: its row turns offline
    real_nodes[1].join()
    wait_until(browser, lambda d: row_states(d).get("node-2") == "offline", "node-2 offline")
    assert row_states(browser)["node-1"] == "online"
    assert same_page(browser)

    # the hub restarts while the page is open: it says so, then recovers by itself
    hub.stop()
    hub.join()
    banner = browser.find_element(By.ID, "conn")
    wait_until(browser, lambda d: banner.is_displayed(), "the unreachable banner")
    assert "hub unreachable" in banner.text
    hub_factory(http={"listen": f"127.0.0.1:{port}"})
    wait_until(browser, lambda d: not banner.is_displayed(), "the page reconnects")
    wait_until(browser, lambda d: row_states(d).get("node-1") == "online", "rows after restart")
    assert same_page(browser)

    # the node's and the rollout's pages
    browser.get(f"http://127.0.0.1:{port}/nodes/node-1")
    wait_until(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.spark.big polyline"), "sparks"
    )
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("node-1")
    browser.get(f"http://127.0.0.1:{port}/rollouts/{rid}")
    events = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "ol.events li")]
    assert any("completed" in e for e in events), events
