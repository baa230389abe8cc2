"""/metrics parsed with prometheus_client's parser and checked against what the nodes
sent (scripted telemetry, real nodes) and against the hub's own state."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellwatch.hub.client import HubClient
from cellwatch.hub.counters import DropReason, HubCounters
from cellwatch.hub.service import HubService
from cellwatch.hub.web.metrics import __doc__ as METRICS_DOC
from cellwatch.node.service import NodeService
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.schemas import Telemetry
from cellwatch.shared.states import NodeState, UpdateState
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.helpers.fleetpage import send_telemetry, stored_telemetry, telemetry
from tests.helpers.nodes import node_settings
from tests.helpers.rollouts import fleet_on_v1, ref, seen_by_hub, until
from tests.hub.conftest import Bundles, NodeMaker
from tests.hub.web import Samples, get, sample, scrape

REPO = Path(__file__).resolve().parents[2]


def node_values(samples: Samples, node_id: str, version: str) -> dict[str, float]:
    labels = {"node_id": node_id, "model_version": version}
    out = {
        name: sample(samples, name, **labels)
        for name in (
            "cellwatch_node_up",
            "cellwatch_node_stale",
            "cellwatch_node_images_processed_total",
            "cellwatch_node_throughput_images_per_second",
            "cellwatch_node_inflight_images",
            "cellwatch_node_resident_memory_bytes",
        )
    }
    for q in ("0.5", "0.95", "0.99"):
        out[f"latency {q}"] = sample(
            samples, "cellwatch_node_latency_seconds", quantile=q, **labels
        )
    return out


def test_node_figures_are_what_the_node_sent(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    n1, n2, _ = fleet_on_v1(bundles, fake_nodes)
    seen_by_hub(operator, 3)
    sent = telemetry("node-1", errors=5)  # 2 undecodable_image + 1 expired + 2 uncounted
    send_telemetry(n1, sent.to_json())
    wait_for(lambda: stored_telemetry(hub, "node-1") is not None, what="telemetry")
    s = scrape(hub)
    assert node_values(s, "node-1", "1.0.0") == {
        "cellwatch_node_up": 1.0,
        "cellwatch_node_stale": 0.0,
        "cellwatch_node_images_processed_total": 120.0,
        "cellwatch_node_throughput_images_per_second": 12.5,
        "cellwatch_node_inflight_images": 4.0,
        "cellwatch_node_resident_memory_bytes": 512.5 * 1024 * 1024,
        "latency 0.5": 0.041,
        "latency 0.95": 0.0775,
        "latency 0.99": 0.09025,
    }
    errors = {
        code: sample(
            s, "cellwatch_node_errors_total", node_id="node-1", model_version="1.0.0", code=code
        )
        for code in ("undecodable_image", "expired", "unknown")
    }
    assert errors == {"undecodable_image": 2.0, "expired": 1.0, "unknown": 2.0}
    # a node without telemetry has its state but no telemetry figures
    assert sample(s, "cellwatch_node_up", node_id="node-2", model_version="1.0.0") == 1.0
    assert not any(
        dict(labels).get("node_id") == "node-2"
        for name, labels in s
        if name == "cellwatch_node_images_processed_total"
    )
    assert sample(s, "cellwatch_hub_nodes", state="online") == 3.0
    assert sample(s, "cellwatch_hub_nodes", state="conflict") == 0.0
    n2.publish_status(NodeState.OFFLINE)
    wait_for(
        lambda: (
            sample(scrape(hub), "cellwatch_node_up", node_id="node-2", model_version="1.0.0") == 0.0
        ),
        what="node-2 down",
    )


def test_hub_figures_rollouts_bytes_queue_and_drops(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    n1, n2, n3 = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
    seen_by_hub(operator, 3)
    operator.push(bundles.v2)
    rid = operator.rollout_start(
        RolloutStartArgs(name="toy", version="2.0.0", waves="1,100%")
    ).rollout_id
    wait_for(lambda: len(n1.desired) == 1, what="canary desired")
    sha = ref(bundles, "2.0.0").manifest_sha256
    fetched = n1.download(sha)  # the canary downloads for real
    n1.report(n1.desired[0], UpdateState.DOWNLOADING, 0.5)
    until(operator, rid, lambda i: i.targets[0].state == "downloading")
    s = scrape(hub)
    assert sample(s, "cellwatch_rollouts", state="running") == 1.0
    assert sample(s, "cellwatch_rollouts", state="completed") == 0.0
    targets = {
        state: sample(s, "cellwatch_rollout_targets", rollout_id=rid, phase="rollout", state=state)
        for state in ("downloading", "waiting")
    }
    assert targets == {"downloading": 1.0, "waiting": 2.0}
    served = sample(
        s, "cellwatch_bundle_bytes_served_total", manifest_sha256=sha, model="toy", version="2.0.0"
    )
    assert served == sum(len(b) for b in fetched.values()) == n1.bytes_fetched
    assert sample(s, "cellwatch_hub_fetch_requests_total") == hub.fetch.requests > 0
    assert sample(s, "cellwatch_hub_control_queue_depth") == 0.0
    assert sample(s, "cellwatch_hub_models") == 1.0
    committed = sample(s, "cellwatch_hub_database_commits_total")
    assert committed == hub.db.commits > 0  # the push, the rollout, the nodes' statuses
    assert sample(s, "cellwatch_hub_messages_dropped_total", reason="malformed") == 0.0
    send_telemetry(n2, b'{"schema": "cellwatch.telemetry/1", "node_id": "node-2"}')
    send_telemetry(n3, telemetry("node-1").to_json())  # names another node than its topic
    wait_for(
        lambda: sum(hub.counters.dropped_by_reason().values()) == 2, what="two dropped messages"
    )
    s = scrape(hub)
    assert sample(s, "cellwatch_hub_messages_dropped_total", reason="malformed") == 1.0
    assert sample(s, "cellwatch_hub_messages_dropped_total", reason="wrong_node") == 1.0
    assert sample(s, "cellwatch_hub_messages_dropped_total", reason="fetch_queue_full") == 0.0
    assert ("process_resident_memory_bytes", ()) in s  # the hub's own process


def test_counters_count_each_reason() -> None:
    c = HubCounters()
    c.dropped("fetch_queue_full")
    c.dropped("input_too_large", 3)  # a reason added elsewhere appears as it is
    assert c.dropped_by_reason() == {
        **{str(reason): 0 for reason in DropReason},
        "fetch_queue_full": 1,
        "input_too_large": 3,
    }


@pytest.fixture
def real_nodes(broker: Broker, bundles: Bundles, tmp_path: Path) -> Iterator[list[NodeService]]:
    nodes = []
    for node_id in ("node-1", "node-2"):
        settings = node_settings(
            broker, (bundles.v1, bundles.keys), node_id, updates={"store_dir": tmp_path / node_id}
        )
        node = NodeService(settings)
        node.start()
        nodes.append(node)
    yield nodes
    for node in nodes:
        if node.mqtt.connected:
            node.join()


def test_real_nodes_figures_match_their_telemetry(
    broker: Broker, hub: HubService, real_nodes: list[NodeService]
) -> None:
    watch = Collector(broker.settings("hub"), T.node_filter("telemetry"), name="telemetry-watch")
    requester = Requester(broker.settings("client"))
    try:
        for _ in range(12):
            requester.request(images.jpeg())
        bad = requester.send(b"not an image")  # one error Result: undecodable_image
        requester.result(bad)
        wait_for(
            lambda: sum(n.stats.processed for n in real_nodes) == 13, what="13 images answered"
        )

        def sent() -> dict[tuple[str, int], Telemetry]:
            out = {}
            for m in watch.messages:
                t = Telemetry.model_validate_json(m.payload)
                out[(t.node_id, t.processed)] = t
            return out

        def processed_total() -> float:
            return sum(
                v
                for (name, _), v in scrape(hub).items()
                if name == "cellwatch_node_images_processed_total"
            )

        wait_for(lambda: processed_total() == 13, what="the hub's figures reach the 13 images")
        s = scrape(hub)
        telemetry_sent = sent()
        errors = 0.0
        for node in real_nodes:
            processed = sample(
                s,
                "cellwatch_node_images_processed_total",
                node_id=node.node_id,
                model_version="1.0.0",
            )
            t = telemetry_sent[(node.node_id, int(processed))]  # a message the node sent
            values = node_values(s, node.node_id, "1.0.0")
            assert values["cellwatch_node_throughput_images_per_second"] == t.throughput_ips
            assert values["cellwatch_node_inflight_images"] == t.inflight
            assert values["cellwatch_node_resident_memory_bytes"] == t.rss_mb * 1024 * 1024
            assert values["latency 0.99"] == pytest.approx(t.latency_ms.p99 / 1000)
            for code, count in t.errors_by_code.items():
                errors += count
                assert (
                    sample(
                        s,
                        "cellwatch_node_errors_total",
                        node_id=node.node_id,
                        model_version="1.0.0",
                        code=code,
                    )
                    == count
                )
        assert errors == 1.0
    finally:
        requester.close()
        watch.close()


def test_the_grafana_dashboard_and_the_docs_use_exported_names(hub: HubService) -> None:
    families = [
        f
        for f in text_string_to_metric_families(get(hub, "/metrics").text)
        if f.name.startswith("cellwatch_")
    ]
    exported = {f"{f.name}_total" if f.type == "counter" else f.name for f in families}
    documented = set(re.findall(r"\bcellwatch_[a-z_]+", METRICS_DOC or ""))
    assert documented == exported, "hub/web/metrics.py's docstring lists what it exports"
    exported |= {  # what a query of a histogram names
        f"{f.name}_{part}"
        for f in families
        if f.type == "histogram"
        for part in ("bucket", "sum", "count")
    }
    readme = (REPO / "hub" / "README.md").read_text()
    assert documented <= set(re.findall(r"\bcellwatch_[a-z_]+", readme)), "README lists them"
    dashboard = json.loads((REPO / "deploy" / "grafana" / "cellwatch-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(exprs) >= 8
    used = {n for e in exprs for n in re.findall(r"\bcellwatch_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    scrape_config = (REPO / "deploy" / "prometheus.example.yml").read_text()
    assert "metrics_path: /metrics" in scrape_config and "127.0.0.1:8321" in scrape_config
    rules = (REPO / "deploy" / "prometheus.rules.example.yml").read_text()
    assert "prometheus.rules.example.yml" in scrape_config  # rule_files names it
    in_rules = set(re.findall(r"\bcellwatch_[a-z_]+", rules))
    assert {"cellwatch_node_drift", "cellwatch_shadow_skipped_total"} <= in_rules
    assert in_rules <= exported, in_rules - exported
