"""Prometheus `/metrics`: a collector that reads the fleet and rollouts at scrape time,
on a registry of this hub's own (not prometheus_client's global one).

Names and labels (deploy/grafana/cellwatch-fleet.json uses them):

per node, labels node_id, model_version ("" when unknown); from its last Telemetry:
  cellwatch_node_up                              1 online, 0 offline / stale / conflict
  cellwatch_node_stale                           1 online but silent (see hub/fleet.py)
  cellwatch_node_last_seen_timestamp_seconds
  cellwatch_node_images_processed_total          images answered since the node started
  cellwatch_node_errors_total{code}              error Results since start, by code
  cellwatch_node_throughput_images_per_second    over the node's telemetry window
  cellwatch_node_latency_seconds{quantile}       0.5, 0.95, 0.99 over that window
  cellwatch_node_inflight_images
  cellwatch_node_resident_memory_bytes
  cellwatch_node_model_error{code}               1 while the node reports a model error
  cellwatch_node_retained_images_total           retained images the broker replayed to
                                                 the node (stored there until cleared)
  cellwatch_node_confidence                      histogram of calibrated p(ALL) (the bundle's
                                                 positive label) since the node started
  cellwatch_node_predictions_total{label}        images per predicted label since start
  cellwatch_node_drift{signal}                   0 ok, 1 watch, 2 alert (node/drift.py); no
                                                 sample without a reference or while collecting
  cellwatch_node_drift_psi{signal}               the signal's population stability index
  cellwatch_node_accuracy_estimate{supported}    label-free estimate over the drift window
                                                 (supported="false": calibration too weak)
shadow phases, labels rollout_id, node_id (every stored window, kept across restarts):
  cellwatch_shadow_images_total                  images scored by both models
  cellwatch_shadow_agreements_total              of them, with the same label
  cellwatch_shadow_skipped_total                 sampled images a busy node did not score
per site, label site (sites: a lab's broker bridged to the hub's, hub/sites.py):
  cellwatch_site_link_up                         1 while its bridge is connected, 0 down
hub:
  cellwatch_hub_nodes{state}                     nodes per state (`unreachable`: at a
                                                 site whose link is down)
  cellwatch_hub_models                           models in the registry
  cellwatch_hub_models_revoked                   of which revoked
  cellwatch_rollouts{state}                      rollouts per state
  cellwatch_rollout_targets{rollout_id,phase,state}  targets of active rollouts
  cellwatch_bundle_bytes_served_total{manifest_sha256,model,version}  kept across restarts
  cellwatch_hub_fetch_requests_total, cellwatch_hub_fetch_errors_total
  cellwatch_hub_control_queue_depth              messages waiting for the control thread
  cellwatch_hub_control_queue_peak               the most that ever waited (since start)
  cellwatch_hub_messages_dropped_total{reason}   incoming messages dropped (hub/counters.py)
  cellwatch_hub_database_commits_total           write transactions of the hub's database
  cellwatch_hub_start_time_seconds
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import ValidationError

from cellwatch.hub.web.reader import FleetReader
from cellwatch.shared.drift import CONFIDENCE_CUTS
from cellwatch.shared.schemas import Telemetry
from cellwatch.shared.states import DRIFT_SEVERITY, NodeState, RolloutState

log = logging.getLogger(__name__)

MiB = 1024 * 1024
NODE_LABELS = ["node_id", "model_version"]
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


class FleetCollector(Collector):
    def __init__(self, reader: FleetReader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        yield from self._nodes(now)
        yield from self._shadow()
        yield from self._hub()

    def _nodes(self, now: float) -> Iterator[Metric]:
        reply = self.reader.queries.nodes(now)
        nodes = reply.nodes
        link = GaugeMetricFamily(
            "cellwatch_site_link_up",
            "1 while the site's bridge to the central broker is up",
            labels=["site"],
        )
        for s in reply.sites:
            if s.link_up is not None:
                link.add_metric([s.site], 1.0 if s.link_up else 0.0)
        yield link

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=NODE_LABELS + (extra or []))

        def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=NODE_LABELS + (extra or []))

        up = gauge("cellwatch_node_up", "1 if the node is online (not stale, no conflict)")
        stale = gauge("cellwatch_node_stale", "1 if the node is online but has gone silent")
        seen = gauge("cellwatch_node_last_seen_timestamp_seconds", "last message from the node")
        processed = counter("cellwatch_node_images_processed", "images answered since start")
        errors = counter("cellwatch_node_errors", "error Results since start", ["code"])
        rate = gauge(
            "cellwatch_node_throughput_images_per_second", "images/s over the telemetry window"
        )
        latency = gauge(
            "cellwatch_node_latency_seconds",
            "receipt-to-Result latency quantiles over the telemetry window",
            ["quantile"],
        )
        inflight = gauge("cellwatch_node_inflight_images", "images received, not yet answered")
        rss = gauge("cellwatch_node_resident_memory_bytes", "the node process's resident memory")
        model_error = gauge(
            "cellwatch_node_model_error",
            "1 while the node serves an earlier bundle than it should, or none (code: why)",
            ["code"],
        )
        confidence = HistogramMetricFamily(
            "cellwatch_node_confidence",
            "calibrated p(positive label), i.e. p(ALL), of the images answered since start",
            labels=NODE_LABELS,
        )
        predictions = counter(
            "cellwatch_node_predictions", "images per predicted label since start", ["label"]
        )
        drift = gauge(
            "cellwatch_node_drift",
            "drift state of a signal against the bundle's reference: 0 ok, 1 watch, 2 alert",
            ["signal"],
        )
        psi = gauge(
            "cellwatch_node_drift_psi",
            "population stability index of a signal, live window vs reference",
            ["signal"],
        )
        accuracy = gauge(
            "cellwatch_node_accuracy_estimate",
            "accuracy estimated without labels from calibrated probabilities (drift window)",
            ["supported"],
        )
        retained = counter(
            "cellwatch_node_retained_images",
            "retained images the broker replayed to the node since it started: each is "
            "stored in the broker until the operator clears it (deploy/README.md)",
        )
        by_state = GaugeMetricFamily("cellwatch_hub_nodes", "nodes per state", labels=["state"])
        counts = dict.fromkeys(NodeState, 0)
        for n in nodes:
            counts[n.state] += 1
            t = None
            if n.telemetry is not None:
                try:
                    t = Telemetry.model_validate(n.telemetry)
                except ValidationError:
                    log.debug("node %s: stored telemetry not readable: skipped", n.node_id)
            version = n.model.version if n.model else (t.model_version if t else None) or ""
            labels = [n.node_id, version]
            up.add_metric(labels, 1.0 if n.state == NodeState.ONLINE else 0.0)
            stale.add_metric(labels, 1.0 if n.state == NodeState.STALE else 0.0)
            if n.last_seen is not None:
                seen.add_metric(labels, n.last_seen.timestamp())
            if n.model_error is not None:
                model_error.add_metric([*labels, n.model_error.code.value], 1.0)
            if t is None:
                continue
            processed.add_metric(labels, float(t.processed))
            by_code = dict(t.errors_by_code)
            rest = t.errors - sum(by_code.values())
            if rest > 0:  # a node that does not count by code (or counts fewer)
                by_code["unknown"] = by_code.get("unknown", 0) + rest
            for code, count in sorted(by_code.items()):
                errors.add_metric([*labels, code], float(count))
            rate.add_metric(labels, t.throughput_ips)
            for q, attr in QUANTILES:
                latency.add_metric([*labels, q], getattr(t.latency_ms, attr) / 1000.0)
            inflight.add_metric(labels, float(t.inflight))
            rss.add_metric(labels, t.rss_mb * MiB)
            retained.add_metric(labels, float(t.retained_images))
            d = t.drift
            if d is None:
                continue
            running, buckets = 0, []
            for edge, count in zip((*CONFIDENCE_CUTS, None), d.total_confidence, strict=False):
                running += count
                buckets.append(("+Inf" if edge is None else f"{edge:g}", float(running)))
            confidence.add_metric(labels, buckets, d.total_confidence_sum)
            for label, count in sorted(d.total_labels.items()):
                predictions.add_metric([*labels, label], float(count))
            for signal, figures in sorted(d.signals.items()):
                if figures.state in DRIFT_SEVERITY:
                    severity = float(DRIFT_SEVERITY[figures.state])
                    drift.add_metric([*labels, signal.value], severity)
                if figures.psi is not None:
                    psi.add_metric([*labels, signal.value], figures.psi)
            if d.accuracy is not None:
                supported = "true" if d.accuracy.supported else "false"
                accuracy.add_metric([*labels, supported], d.accuracy.value)
        for state, count in counts.items():
            by_state.add_metric([state.value], float(count))
        yield from (up, stale, seen, processed, errors, rate, latency, inflight, rss, model_error)
        yield from (confidence, predictions, drift, psi, accuracy)
        yield retained
        yield by_state

    def _shadow(self) -> Iterator[Metric]:
        labels = ["rollout_id", "node_id"]
        images = CounterMetricFamily(
            "cellwatch_shadow_images",
            "images scored by the candidate and the serving model",
            labels=labels,
        )
        agreements = CounterMetricFamily(
            "cellwatch_shadow_agreements",
            "scored images with the same label from both",
            labels=labels,
        )
        skipped = CounterMetricFamily(
            "cellwatch_shadow_skipped",
            "images sampled for shadow scoring that a busy node skipped",
            labels=labels,
        )
        for rollout_id, node_id, n, k, skip in self.reader.db.shadow_totals():
            images.add_metric([rollout_id, node_id], float(n))
            agreements.add_metric([rollout_id, node_id], float(k))
            skipped.add_metric([rollout_id, node_id], float(skip))
        yield from (images, agreements, skipped)

    def _hub(self) -> Iterator[Metric]:
        src = self.reader.sources
        db = self.reader.db
        models = db.models()
        yield GaugeMetricFamily("cellwatch_hub_models", "models in the registry", len(models))
        yield GaugeMetricFamily(
            "cellwatch_hub_models_revoked",
            "revoked models in the registry",
            sum(1 for m in models if m.revoked),
        )
        states = db.rollout_states()
        rollouts = GaugeMetricFamily("cellwatch_rollouts", "rollouts per state", labels=["state"])
        for state in RolloutState:
            rollouts.add_metric([state.value], float(states.get(state, 0)))
        yield rollouts
        targets = GaugeMetricFamily(
            "cellwatch_rollout_targets",
            "targets of active rollouts per phase (rollout, rollback) and state",
            labels=["rollout_id", "phase", "state"],
        )
        for r in db.rollouts(active_only=True, limit=1000):
            per: dict[tuple[str, str], int] = {}
            for t in r.targets:
                key = (t.phase.value, t.state.value)
                per[key] = per.get(key, 0) + 1
            for (phase, target_state), count in sorted(per.items()):
                targets.add_metric([r.rollout_id, phase, target_state], float(count))
        yield targets
        names = {m.manifest_sha256: m for m in models}
        served = CounterMetricFamily(
            "cellwatch_bundle_bytes_served",
            "bundle bytes sent to nodes (kept across hub restarts)",
            labels=["manifest_sha256", "model", "version"],
        )
        for sha, n in sorted(src.served.served_by_bundle().items()):
            m = names.get(sha)
            served.add_metric([sha, m.name if m else "", m.version if m else ""], float(n))
        yield served
        yield CounterMetricFamily(
            "cellwatch_hub_fetch_requests", "fetch requests since start", src.served.requests
        )
        yield CounterMetricFamily(
            "cellwatch_hub_fetch_errors", "fetch requests answered with an error", src.served.errors
        )
        yield GaugeMetricFamily(
            "cellwatch_hub_control_queue_depth",
            "messages and tasks waiting for the hub's control thread",
            float(src.control_depth()),
        )
        yield GaugeMetricFamily(
            "cellwatch_hub_control_queue_peak",
            "the most messages and tasks that waited for the control thread since start",
            float(src.control_peak()),
        )
        dropped = CounterMetricFamily(
            "cellwatch_hub_messages_dropped",
            "incoming messages the hub dropped, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(src.counters.dropped_by_reason().items()):
            dropped.add_metric([reason], float(count))
        yield dropped
        yield CounterMetricFamily(
            "cellwatch_hub_database_commits",
            "write transactions the hub committed to its database since start",
            float(src.db_commits()),
        )
        yield GaugeMetricFamily(
            "cellwatch_hub_start_time_seconds",
            "when this hub process started (seconds since the epoch)",
            src.started_at.timestamp(),
        )


def make_registry(reader: FleetReader) -> CollectorRegistry:
    """A registry of this hub's own: the fleet collector and the hub process's figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(reader))
    ProcessCollector(registry=registry)
    return registry
