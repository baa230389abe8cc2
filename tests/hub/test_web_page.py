"""The fleet page, node and rollout pages and /api over real HTTP from a real hub
(scripted nodes on the real broker): what they show, escaping, bad input."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.fleet import node_state
from cellwatch.hub.records import NodeRecord
from cellwatch.hub.service import HubService
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.schemas import UpdateError
from cellwatch.shared.states import NodeState, UpdateState
from tests.broker import Broker
from tests.harness import T, wait_for
from tests.helpers.fleetpage import HOSTILE, send_telemetry, stored_telemetry, telemetry
from tests.helpers.hubcli import cli
from tests.helpers.rollouts import fleet_on_v1, seen_by_hub, until
from tests.hub.conftest import Bundles, NodeMaker
from tests.hub.web import Reply, get
from tests.models import write_test_bundle


def rows(page: Reply) -> dict[str, str]:
    """node id -> state, from the fleet page's node rows."""
    return dict(re.findall(r'<tr data-node="([^"]*)" data-state="([^"]*)"', page.text))


# -- the pages ----------------------------------------------------------------------------


def test_fleet_rollout_and_node_pages_follow_a_rollout_with_a_failure(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    n1, n2, n3 = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
    seen_by_hub(operator, 3)
    page = get(hub, "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert rows(page) == {"node-1": "online", "node-2": "online", "node-3": "online"}
    assert "No rollout yet" in page.text
    operator.push(bundles.v1)
    operator.push(bundles.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", waves="1,100%", max_failures="0")
    ).rollout_id
    wait_for(lambda: len(n1.desired) == 1, what="canary desired")
    n1.report(n1.desired[0], UpdateState.DOWNLOADING, 0.5)
    until(operator, rid, lambda i: i.targets[0].state == "downloading")
    page = get(hub, "/")
    assert f'data-rollout="{rid}" data-state="running" data-active="0" data-total="3"' in page.text
    assert "1 downloading" in page.text and "2 waiting" in page.text
    n1.report(n1.desired[0], UpdateState.ACTIVE, 1.0)
    wait_for(lambda: len(n2.desired) == 1 and len(n3.desired) == 1, what="wave 2")
    n2.report(n2.desired[0], UpdateState.ACTIVE, 1.0)
    n3.report(
        n3.desired[0],
        UpdateState.FAILED,
        error=UpdateError(
            code=UpdateErrorCode.SELF_TEST_FAILED, message=f"golden mismatch {HOSTILE}"
        ),
    )
    info = until(operator, rid, lambda i: i.state == "aborted")
    page = get(hub, "/")
    assert f'data-rollout="{rid}" data-state="aborted" data-active="2" data-total="3"' in page.text
    assert "<code>self_test_failed</code> golden mismatch &lt;script&gt;" in page.text
    assert HOSTILE not in page.text
    # the models: both pushed; the toy bundles say nothing of their data: no badge
    models = re.findall(r'<tr data-model="toy" data-version="([^"]+)">', page.text)
    assert models == ["1.0.0", "2.0.0"]
    assert 'class="flag' not in page.text
    # the rollout's page: each node's state and error, and the events in order
    rp = get(hub, f"/rollouts/{rid}")
    assert rp.status == 200
    targets = dict(re.findall(r'<tr data-target="([^"]*)" data-state="([^"]*)"', rp.text))
    assert targets == {"node-1": "active", "node-2": "active", "node-3": "failed"}
    events = re.findall(r"<li><time>[^<]*</time> ([^<]*)</li>", rp.text)
    assert events[0] == "wave 1/2 issued: node-1" and events[-1].startswith("aborted"), events
    assert any(e.startswith("node node-3 failed (self_test_failed)") for e in events), events
    assert info.reason is not None and info.reason in rp.text
    # the node's page: its part in the rollout
    np = get(hub, "/nodes/node-3")
    assert np.status == 200 and f'<a href="/rollouts/{rid}">{rid}</a>' in np.text
    assert "self_test_failed: golden mismatch &lt;script&gt;" in np.text
    # the live parts the page's script fetches
    frag = get(hub, "/?fragment=1")
    assert frag.status == 200 and "<html" not in frag.text and 'data-node="node-1"' in frag.text


def test_unknown_pages_are_404_and_nothing_can_be_changed(hub: HubService) -> None:
    for path in ("/nodes/node-9", "/rollouts/r7", "/nope"):
        assert get(hub, path).status == 404, path
    assert "No node node-9" in get(hub, "/nodes/node-9").text
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/", "/api/nodes", "/metrics", "/rollouts/r1"):
            assert get(hub, path, method=method).status == 405, (method, path)
    page = get(hub, "/")
    assert "<form" not in page.text and "<button" not in page.text


def test_api_serves_exactly_what_the_cli_prints(
    broker: Broker, hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    fleet_on_v1(bundles, fake_nodes)
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    rid = operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).rollout_id
    until(operator, rid, lambda i: i.state == "completed")
    pairs = [
        (["nodes"], "/api/nodes"),
        (["models"], "/api/models"),
        (["models", "--name", "toy"], "/api/models?name=toy"),
        (["stats"], "/api/stats"),
        (["rollout", "list"], "/api/rollouts"),
        (["rollout", "status", rid], f"/api/rollouts/{rid}"),
        (["rollout", "status"], "/api/rollouts/latest"),
    ]
    for args, path in pairs:
        proc = cli(broker, *args, "--json")
        assert proc.returncode == 0, proc.stderr
        reply = get(hub, path)
        assert reply.status == 200 and reply.headers["content-type"] == "application/json"
        assert reply.text == proc.stdout, (args, path)
    assert json.loads(get(hub, "/api/nodes").text)["nodes"][0]["state"] == "online"
    missing = get(hub, "/api/rollouts/r99")
    assert missing.status == 404
    assert json.loads(missing.text) == {"code": "not_found", "message": "no rollout 'r99'"}
    bad = get(hub, "/api/models?name=%3Cscript%3E")
    assert bad.status == 400 and json.loads(bad.text)["code"] == "bad_request"


# -- models ---------------------------------------------------------------------------------

DEPLOYED = {
    "deployed": {
        "n": 240,
        "metrics": {
            "accuracy": {"value": 0.9125, "ci95": [0.871, 0.944]},
            "sensitivity": {"value": 0.88, "ci95": [0.8, 0.93]},
            "roc_auc": {"value": None, "ci95": None},
        },
    }
}


def test_models_show_metrics_with_intervals_and_provenance_badges(
    hub: HubService, operator: HubClient, bundles: Bundles, tmp_path: Path
) -> None:
    gated = write_test_bundle(
        tmp_path / "gated",
        bundles.keys,
        version="4.0.0",
        metrics=DEPLOYED,
        provenance={"synthetic": True, "base_checkpoint": None, "gate": {"overridden": True}},
    )
    trained = write_test_bundle(
        tmp_path / "tf",
        bundles.keys,
        version="5.0.0",
        metrics={"evaluation": {"accuracy": 0.75, "n": 40}},
        provenance={"synthetic": False, "base_checkpoint": "inception_v3.ckpt"},
    )
    operator.push(gated)
    operator.push(trained)
    page = get(hub, "/").text
    row4 = page[page.index('data-version="4.0.0"') :]
    row4 = row4[: row4.index("</tr>")]
    assert 'accuracy</span> 0.912 <span class="ci">(95% CI 0.871–0.944)</span>' in row4
    assert 'sensitivity</span> 0.880 <span class="ci">(95% CI 0.800–0.930)</span>' in row4
    assert "roc_auc</span> –" in row4 and "n = 240 images" in row4
    assert 'class="flag untrained"' in row4 and 'class="flag degraded"' in row4
    assert 'class="flag synthetic"' in row4
    row5 = page[page.index('data-version="5.0.0"') :]
    row5 = row5[: row5.index("</tr>")]
    assert "evaluation.accuracy</span> 0.750" in row5
    assert "n = 40 images, no intervals in this bundle" in row5
    assert 'class="flag' not in row5
    api = {m["version"]: m for m in json.loads(get(hub, "/api/models").text)["models"]}
    assert (api["4.0.0"]["untrained"], api["4.0.0"]["degraded"]) == (True, True)
    assert api["4.0.0"]["synthetic"] is True
    assert (api["5.0.0"]["untrained"], api["5.0.0"]["degraded"]) == (False, False)


# -- node states ------------------------------------------------------------------------------


def test_node_state_at_read_time() -> None:
    rec = NodeRecord("n", state=NodeState.ONLINE, last_seen=1000.0)
    assert node_state(rec, 1030.0) is NodeState.ONLINE  # 3 x the default 10 s
    assert node_state(rec, 1030.5) is NodeState.STALE
    rec.telemetry = {"window_s": 0.5}
    assert node_state(rec, 1001.5) is NodeState.ONLINE
    assert node_state(rec, 1001.6) is NodeState.STALE
    offline = NodeRecord("n", state=NodeState.OFFLINE, last_seen=0.0)
    assert node_state(offline, 1e9) is NodeState.OFFLINE
    conflict = NodeRecord("n", state=NodeState.CONFLICT, last_seen=0.0)
    assert node_state(conflict, 1e9) is NodeState.CONFLICT


def test_a_silent_node_turns_stale_and_back(
    hub: HubService, operator: HubClient, fake_nodes: NodeMaker
) -> None:
    node = fake_nodes("node-1")
    send_telemetry(node, telemetry("node-1", window_s=0.2).to_json())
    wait_for(lambda: rows(get(hub, "/")).get("node-1") == "stale", what="stale on the page")
    assert operator.nodes().nodes[0].state == "stale"
    page = get(hub, "/")
    assert "over 3 × 0.2 s telemetry interval" in page.text
    send_telemetry(node, telemetry("node-1", window_s=3600).to_json())
    wait_for(lambda: rows(get(hub, "/")).get("node-1") == "online", what="online again")


def test_a_conflict_record_is_rendered_with_its_explanation(hub: HubService) -> None:
    hub.db.save_node(NodeRecord("node-7", state=NodeState.CONFLICT, last_seen=time.time()))
    page = get(hub, "/")
    assert rows(page) == {"node-7": "conflict"}
    row = page.text[page.text.index('data-node="node-7"') :]
    row = row[: row.index("</tr>")]
    assert '<span class="badge alarm">conflict</span>' in row
    assert "two processes use this node id" in row
    assert '<span class="chip alarm">1 conflict</span>' in page.text
    node_page = get(hub, "/nodes/node-7")
    assert 'data-state="conflict"' in node_page.text and "two processes use this" in node_page.text
    assert json.loads(get(hub, "/api/nodes").text)["nodes"][0]["state"] == "conflict"


# -- bad input ----------------------------------------------------------------------------------


def test_hostile_strings_from_the_network_render_inert(
    hub: HubService,
    operator: HubClient,
    bundles: Bundles,
    fake_nodes: NodeMaker,
    tmp_path: Path,
) -> None:
    node = fake_nodes("node-1", tags=("ward-a", HOSTILE))
    status = node.status().model_copy(update={"device": HOSTILE, "software": {"x": HOSTILE}})
    assert node.mqtt.publish_wait(T.status("node-1"), status.to_json(), qos=1, retain=True)
    # a node id with markup cannot get in: the message is dropped (and counted)
    forged = status.model_dump(mode="json", by_alias=True) | {"node_id": HOSTILE}
    assert node.mqtt.publish_wait(T.status("node-1"), json.dumps(forged).encode(), qos=1)
    wait_for(lambda: hub.counters.dropped_by_reason()["malformed"] == 1, what="forged id dropped")
    assert [n.node_id for n in hub.db.nodes()] == ["node-1"]
    bundle = write_test_bundle(
        tmp_path / "evil",
        bundles.keys,
        version="6.0.0",
        metrics={HOSTILE: {"nested": HOSTILE, "score": 0.5}},
        provenance={"synthetic": False, "note": HOSTILE},
    )
    wait_for(lambda: (hub.db.node("node-1") or NodeRecord("x")).device == HOSTILE)
    operator.push(bundle)
    for path in ("/", "/nodes/node-1", "/?fragment=1", "/nodes/node-1?fragment=1"):
        page = get(hub, path)
        assert page.status == 200, path
        assert HOSTILE not in page.text, path
        assert "<script>window" not in page.text and "<img src=x" not in page.text, path
    page = get(hub, "/")
    escaped = (
        "&lt;script&gt;window.pwned=1&lt;/script&gt;"
        "&lt;img src=x onerror=&#34;window.pwned=1&#34;&gt;"
    )
    assert f'<span class="tag">{escaped}</span>' in page.text
    assert escaped in get(hub, "/nodes/node-1").text
    assert page.text.count("<script") == 1  # the page's own script only


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("processed", -1),
        ("throughput_ips", float("nan")),
        ("rss_mb", float("inf")),
        ("rss_mb", 1e300),
        ("latency_ms", {"p50": 1.0, "p95": -2.0, "p99": 3.0}),
        ("errors_by_code", {"<b>x</b>": 1}),
    ],
)
def test_absurd_telemetry_is_dropped_and_the_last_good_one_kept(
    hub: HubService, fake_nodes: NodeMaker, field: str, value: object
) -> None:
    node = fake_nodes("node-1")
    good = telemetry("node-1")
    send_telemetry(node, good.to_json())
    wait_for(lambda: stored_telemetry(hub, "node-1") is not None, what="good telemetry")
    bad = good.model_dump(mode="json", by_alias=True) | {field: value}
    send_telemetry(node, json.dumps(bad, allow_nan=True).encode())
    wait_for(lambda: hub.counters.dropped_by_reason()["malformed"] == 1, what="dropped")
    assert stored_telemetry(hub, "node-1") == good.model_dump(mode="json", by_alias=True)
    page = get(hub, "/")
    assert page.status == 200 and rows(page) == {"node-1": "online"}
    assert '<td class="num">12.5</td>' in page.text


def test_huge_but_valid_figures_render_and_export(hub: HubService, fake_nodes: NodeMaker) -> None:
    node = fake_nodes("node-1")
    huge = telemetry(
        "node-1", processed=2**53, throughput_ips=1e6, rss_mb=16_000_000.0, window_s=3600
    )
    send_telemetry(node, huge.to_json())
    wait_for(lambda: stored_telemetry(hub, "node-1") is not None, what="telemetry")
    page = get(hub, "/")
    assert '<td class="num">1e+06</td>' in page.text and '<td class="num">1.6e+07</td>' in page.text
    assert get(hub, "/nodes/node-1").status == 200


def test_a_thousand_nodes_render(hub: HubService) -> None:
    now = time.time()
    for i in range(1000):
        rec = NodeRecord(f"n{i:04d}", state=NodeState.ONLINE, last_seen=now, device="CPU")
        rec.telemetry = telemetry(rec.node_id).model_dump(mode="json", by_alias=True)
        hub.db.save_node(rec)
        for k in range(5):
            hub.fleet.history.add(telemetry(rec.node_id, throughput_ips=float(k)), now - 60 * k)
    page = get(hub, "/")
    assert page.status == 200 and len(rows(page)) == 1000
    assert page.text.count("<polyline") == 1000
