"""The demo's MQTT lab client, its image traffic and the hub's CLI driven as an operator."""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from pydantic import ValidationError

from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.manifest import model_flags
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.rpc import Policy, PublishRefused, Reply, Rpc, RpcError
from cellwatch.shared.schemas import NodeStatus, Result
from cellwatch.shared.settings import MqttSettings
from cellwatch.shared.topics import Topics
from cellwatch.training.stats import MetricSet, Proportion
from demolib.common import (
    DRAIN_TIMEOUT_S,
    LABELS,
    MODEL_NAME,
    SOURCE,
    START_TIMEOUT_S,
    DemoError,
    Layout,
    command,
    done,
    shown,
)
from demolib.processes import Child, Command, ProcessGroup
from demolib.services import BrokerInfo, tool, write_operator_toml

# -- the demo's MQTT client ---------------------------------------------------------------

ONE_ATTEMPT = Policy(timeout_s=DRAIN_TIMEOUT_S)
"""The demo sends each image once: a retry would hide an image a node lost in the swap."""


@dataclass
class Request:
    key: str
    image: Path
    truth: str | None
    sent_at: float
    result: Result | None = None
    answered_at: float | None = None
    refused: bool = False
    error: str | None = None
    """Why no Result will come (no answer within DRAIN_TIMEOUT_S)."""

    @property
    def latency_ms(self) -> float | None:
        if self.answered_at is None:
            return None
        return (self.answered_at - self.sent_at) * 1000.0

    @property
    def failed(self) -> bool:
        return self.refused or (self.result is not None and self.result.status != "ok")


def truth_of(image: Path) -> str | None:
    """ALL-IDB names: `_1` is an ALL blast, `_0` a normal lymphocyte."""
    suffix = image.stem.rsplit("_", 1)[-1]
    return {"0": LABELS[0], "1": LABELS[1]}.get(suffix)


def parse_result(msg: paho.MQTTMessage) -> Result:
    return Result.model_validate_json(msg.payload)


class DemoClient:
    """A lab client: logs in as `client`, publishes images with a Response Topic and
    Correlation Data (MQTT v5) through the shared request layer
    (`cellwatch.shared.rpc`), and collects the Results; also follows node statuses."""

    def __init__(self, settings: MqttSettings, topics: Topics) -> None:
        self.topics = topics
        self.reply_topic = topics.replies("client", f"demo-{uuid.uuid4().hex[:8]}")
        self._status_filter = topics.node_filter("status")
        self._cond = threading.Condition()
        self.statuses: dict[str, NodeStatus] = {}
        self.mqtt = MqttClient(
            settings,
            client_id=f"cellwatch-demo-{uuid.uuid4().hex}",
            clean_start=True,
            subscriptions=[(self.reply_topic, 1), (self._status_filter, 1)],
        )
        self.rpc = Rpc(self.mqtt, self.reply_topic, window=1000, name="demo")
        self.mqtt.set_message_handler(self._on_message)

    def connect(self) -> None:
        self.mqtt.connect()

    def close(self) -> None:
        self.mqtt.disconnect()
        self.rpc.close()

    # network thread
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.reply_topic:
            self.rpc.on_message(msg)
        elif msg.payload:
            try:
                status = NodeStatus.model_validate_json(msg.payload)
            except ValidationError:
                return
            with self._cond:
                self.statuses[status.node_id] = status
                self._cond.notify_all()

    def send(self, image: Path, key: str) -> Request:
        """Publish one image (QoS 1); the Result arrives on our Response Topic."""
        req = Request(key, image, truth_of(image), time.monotonic())
        future = self.rpc.submit(
            self.topics.lab_images("client", SOURCE),
            image.read_bytes(),
            parse_result,
            ONE_ATTEMPT,
            user=[("image_id", image.stem)],
            content_type="image/tiff" if image.suffix.lower() in (".tif", ".tiff") else None,
        )
        future.add_done_callback(functools.partial(self._answered, req))
        return req

    def _answered(self, req: Request, future: Future[Reply[Result]]) -> None:
        """The request layer's thread: the Result (or why there is none) is in."""
        with self._cond:
            try:
                reply = future.result()
            except PublishRefused:
                req.refused = True
            except RpcError as exc:
                req.error = str(exc)
            else:
                req.result = reply.value
                req.answered_at = req.sent_at + reply.round_trip_s
            self._cond.notify_all()

    def wait(
        self, predicate: Callable[[], bool], timeout: float, check: Callable[[], None]
    ) -> bool:
        """Wait until predicate() (called under the lock) holds; check() runs every second."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if self._cond.wait_for(
                    predicate, timeout=min(1.0, max(0.0, deadline - time.monotonic()))
                ):
                    return True
            check()
            if time.monotonic() >= deadline:
                return False

    def pending(self, reqs: Sequence[Request]) -> int:
        with self._cond:
            return sum(1 for r in reqs if r.result is None and not r.refused and r.error is None)

    def serving(self, node_id: str) -> str | None:
        """The model version node_id says it serves (None: no model or offline)."""
        with self._cond:
            s = self.statuses.get(node_id)
        if s is None or s.state != "online" or s.model is None:
            return None
        return s.model.version


# -- the demo ---------------------------------------------------------------------------


@dataclass
class Trained:
    tag: str
    version: str
    run: Path
    bundle: Path
    precision: str
    """The precision shipped (fp16 when int8 failed the export gate)."""
    manifest: dict[str, Any]
    """The bundle's manifest.json: metrics of the deployed model, gate, calibration."""
    fallback: str | None = None
    """Why the demo shipped another precision than the profile's, if it did."""

    @property
    def deployed(self) -> MetricSet:
        """The figures of the model the nodes run (its own, on the test split)."""
        return MetricSet.model_validate(self.manifest["metrics"]["deployed"]["metrics"])

    @property
    def tensorflow(self) -> MetricSet:
        return MetricSet.model_validate(self.manifest["metrics"]["tensorflow"]["metrics"])

    @property
    def agreement(self) -> Proportion:
        return Proportion.model_validate(self.manifest["metrics"]["agreement"])

    @property
    def flags(self) -> list[str]:
        return list(model_flags(self.manifest.get("provenance", {})))


class Hub:
    """The hub process and the operator's `cellwatch-hub` commands against it."""

    def __init__(self, group: ProcessGroup, layout: Layout, broker: BrokerInfo) -> None:
        self.group = group
        self.layout = layout
        self.exe = tool("cellwatch-hub")
        self.operator_toml = write_operator_toml(layout, broker)

    def op(self, *args: str) -> list[str]:
        """An operator command (user `operator`, connection from operator.toml)."""
        return [self.exe, *args, "--config", str(self.operator_toml)]

    def serve(self) -> Child:
        argv = [self.exe, "serve", "--config", str(self.layout.hub_toml)]
        command(argv)
        return self.group.start("hub", argv)

    def nodes(self) -> dict[str, Any]:
        """`cellwatch-hub nodes --json`: node id -> what the hub knows of it."""
        out = self.group.run("hub-nodes", self.op("nodes", "--json"), echo=False, timeout=60)
        return {n["node_id"]: n for n in json.loads(out)["nodes"]}

    def wait_for(
        self, what: str, ready: Callable[[dict[str, Any]], bool], timeout: float = START_TIMEOUT_S
    ) -> None:
        """Poll `nodes --json` until ready(nodes) (the hub answers the API, sees the nodes)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready(self.nodes()):
                    return
            except DemoError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the hub did not report {what} within {timeout:g} s; see "
                    f"{shown(self.layout.logs / 'hub.log')}"
                )
            time.sleep(0.5)

    def push(self, bundle: Path) -> None:
        self.group.run("hub-push", self.op("push", str(bundle)), timeout=600)

    def rollout(self, version: str, waves: str, *, confirm_untrained: bool = False) -> str:
        """`rollout start` (with --yes-untrained for a synthetic or untrained model);
        prints it, returns the rollout id."""
        confirm = ["--yes-untrained"] if confirm_untrained else []
        argv = self.op("rollout", "start", MODEL_NAME, version, "--waves", waves, *confirm)
        command(argv[:-2])
        argv.append("--json")
        info = json.loads(self.group.run("hub-rollout", argv, echo=False, timeout=60))
        done(
            f"rollout {info['rollout_id']}: {MODEL_NAME} {version} to {info['target']} "
            f"({len(info['targets'])} nodes), waves {waves}"
        )
        rid: str = info["rollout_id"]
        return rid

    def watch(self, rollout_id: str) -> Command:
        """`rollout status ID --watch`, echoed as it goes; exits 0 once completed."""
        argv = self.op("rollout", "status", rollout_id, "--watch", "--interval", "0.5")
        command(argv[:-2])
        return self.group.spawn("hub-watch", argv, show=False)


class Traffic:
    """Publishes images at a steady rate on a background thread (step 6)."""

    def __init__(
        self, client: DemoClient, images: Sequence[Path], rate: float, max_outstanding: int = 40
    ) -> None:
        self.client = client
        self.images = list(images)
        self.period = 1.0 / rate
        self.max_outstanding = max_outstanding
        self.sent: list[Request] = []
        self.error: str | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.stopped_at = time.monotonic()

    def _run(self) -> None:
        i, next_at = 0, time.monotonic()
        while not self._stop.is_set():
            if self.client.pending(self.sent[-self.max_outstanding * 4 :]) < self.max_outstanding:
                try:
                    self.sent.append(
                        self.client.send(self.images[i % len(self.images)], f"swap-{i}")
                    )
                except (CellwatchError, OSError) as exc:
                    self.error = str(exc)
                    return
                i += 1
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def tally(reqs: Sequence[Request]) -> dict[str, Any]:
    """Counts over requests: answered, failed (error Result or refused publish), missing."""
    answered = [r for r in reqs if r.result is not None]
    by_version: dict[str, int] = {}
    by_node: dict[str, int] = {}
    for r in answered:
        assert r.result is not None
        if r.result.model is not None:
            by_version[r.result.model.version] = by_version.get(r.result.model.version, 0) + 1
        by_node[r.result.node_id] = by_node.get(r.result.node_id, 0) + 1
    errors = [
        f"{r.image.name}: {r.result.error.code} ({r.result.error.message})"
        for r in answered
        if r.result is not None and r.result.error is not None
    ] + [f"{r.image.name}: publish refused by the broker" for r in reqs if r.refused]
    errors += [f"{r.image.name}: {r.error}" for r in reqs if r.error is not None]
    return {
        "sent": len(reqs),
        "answered": len(answered),
        "failed": sum(1 for r in reqs if r.failed),
        "missing": sum(1 for r in reqs if r.result is None and not r.refused),
        "by_version": by_version,
        "by_node": by_node,
        "errors": errors[:10],
    }
