"""Thousands of simulated nodes over a few MQTT connections, for the hub's scale tests.

A real fleet gives every node its own broker user and connection. 2,000 of those in
one test process are 2,000 paho network threads and sockets on a 2-core machine, so a
swarm logs in as `swarm`, a test-only user that `add_swarm_user` adds to the broker's
password file and (rendered) ACL: it may write any node's status, telemetry and update
topics and read any node's desired topic. The hub cannot tell: it sees the same topics
and payloads as from 2,000 nodes. Each swarm node answers a desired model like a node
whose store already holds the bundle (no download: the fetch path has its own tests):
`pending`, `verifying`, `activating`, its new status and `active`.

Wherever a swarm's worker answers a desired model, real nodes would download and
compile: `answer_delay_s` spreads a wave's answers out the way that work does.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence

from cellwatch.shared.mqtt import Message, MqttClient, Will
from cellwatch.shared.schemas import (
    DesiredModel,
    ModelRef,
    NodeStatus,
    UpdateReport,
    utcnow,
)
from cellwatch.shared.states import NodeState, UpdateState
from tests.broker import Broker, sync
from tests.harness import T, quiet_telemetry, wait_for

SWARM_USER = "swarm"
RECEIVE_MAXIMUM = 65535
"""A swarm connection stands for hundreds of nodes: without a large Receive Maximum
the broker would queue (and beyond max_queued_messages drop) their desired models."""


def add_swarm_user(broker: Broker) -> None:
    """Add the test-only `swarm` user and its ACL block, then reload the broker."""
    password = uuid.uuid4().hex
    secret = broker.dir / "secrets" / f"{SWARM_USER}.password"
    secret.write_text(password + "\n")
    subprocess.run(
        ["mosquitto_passwd", "-b", str(broker.dir / "passwd"), SWARM_USER, password],
        check=True,
        capture_output=True,
    )
    p = T.prefix
    block = (
        f"\n# test only: simulated nodes (tests/hub/swarm.py)\nuser {SWARM_USER}\n"
        f"topic write {p}/nodes/+/status\ntopic write {p}/nodes/+/telemetry\n"
        f"topic write {p}/nodes/+/update\ntopic read {p}/nodes/+/desired\n"
    )
    with (broker.dir / "acl").open("a") as acl:
        acl.write(block)
    broker.reload()


class _Conn:
    """One connection carrying a share of the swarm; a worker thread publishes."""

    def __init__(self, swarm: Swarm, broker: Broker, index: int) -> None:
        self.swarm = swarm
        self.work: deque[tuple[str, DesiredModel]] = deque()
        self.cond = threading.Condition()
        self.stop = False
        self.mqtt = MqttClient(
            broker.settings(SWARM_USER),
            client_id=f"swarm-{index}-{uuid.uuid4().hex[:6]}",
            clean_start=True,
            receive_maximum=RECEIVE_MAXIMUM,
            will=Will(f"{T.prefix}/swarm-gone", b""),
        )
        self.mqtt.set_message_handler(self._on_message)
        self.thread = threading.Thread(target=self._run, name=f"swarm-{index}", daemon=True)
        self.thread.start()

    def _on_message(self, msg: Message) -> None:  # network thread: hand over
        if not msg.payload:
            return
        node_id = T.node_id_of(msg.topic)
        if node_id not in self.swarm.models:
            return
        d = DesiredModel.model_validate_json(msg.payload)
        with self.cond:
            self.work.append((node_id, d))
            self.swarm.count_desired(node_id, d)
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stop or bool(self.work))
                if self.stop:
                    return
                node_id, d = self.work.popleft()
            self.swarm.answer(self.mqtt, node_id, d)


class Swarm:
    """node_ids spread over `connections` connections as the `swarm` user."""

    def __init__(
        self,
        broker: Broker,
        node_ids: Sequence[str],
        *,
        model: ModelRef | None,
        connections: int = 4,
        answer: bool = True,
        answer_delay_s: float = 0.0,
    ) -> None:
        self.broker = broker
        self.node_ids = list(node_ids)
        self.answer_desired = answer
        self.answer_delay_s = answer_delay_s
        """Each connection's worker waits this long before each answer (a wave that
        takes a while, as real downloads do)."""
        self.answered = 0
        self.models: dict[str, ModelRef | None] = {n: model for n in self.node_ids}
        self.boot = {n: uuid.uuid4().hex for n in self.node_ids}
        self.since = utcnow()
        self._lock = threading.Lock()
        self.desired: dict[str, list[DesiredModel]] = {n: [] for n in self.node_ids}
        self._conns = [_Conn(self, broker, i) for i in range(connections)]
        self._owner = {n: self._conns[i % connections] for i, n in enumerate(self.node_ids)}

    def connect(self, known: Callable[[], int] | None = None, chunk: int = 250) -> None:
        """Connect, subscribe to every desired topic, publish every node's status; with
        `known` (how many nodes the hub knows), `chunk` statuses at a time, each chunk
        once the hub knows the ones before (a fleet that comes up over a while)."""
        for conn in self._conns:
            conn.mqtt.connect()
        for node_id in self.node_ids:  # each connection its own nodes' desired topics
            self._owner[node_id].mqtt.subscribe(T.desired(node_id), 1)
        for conn in self._conns:
            sync(conn.mqtt)
        step = chunk if known is not None else len(self.node_ids)
        for start in range(0, len(self.node_ids), step):
            for node_id in self.node_ids[start : start + step]:
                self.publish_status(node_id)
            if known is not None:
                self._wait_known(known, min(start + step, len(self.node_ids)))

    @staticmethod
    def _wait_known(known: Callable[[], int], want: int) -> None:
        wait_for(lambda: known() >= want, 120, f"the hub to know {want} nodes")

    def close(self) -> None:
        for conn in self._conns:
            with conn.cond:
                conn.stop = True
                conn.cond.notify_all()
            conn.mqtt.disconnect()

    # -- what the nodes say ------------------------------------------------------------
    def status(self, node_id: str, state: NodeState = NodeState.ONLINE) -> NodeStatus:
        return NodeStatus(
            node_id=node_id,
            state=state,
            boot_id=self.boot[node_id],
            since=self.since,
            model=self.models[node_id],
            device="CPU",
        )

    def publish_status(self, node_id: str, state: NodeState = NodeState.ONLINE) -> None:
        self._owner[node_id].mqtt.publish(
            T.status(node_id), self.status(node_id, state).to_json(), qos=1, retain=True
        )

    def telemetry(self, node_id: str, payload: bytes | None = None) -> None:
        t = quiet_telemetry(node_id, rss_mb=100.0)
        body = payload if payload is not None else t.to_json()
        self._owner[node_id].mqtt.publish(T.telemetry(node_id), body, qos=0)

    def count_desired(self, node_id: str, d: DesiredModel) -> None:
        with self._lock:
            self.desired[node_id].append(d)

    def desired_count(self, rollout_id: str) -> int:
        """Nodes that received a desired of rollout_id."""
        with self._lock:
            return sum(
                1 for ds in self.desired.values() if any(d.rollout_id == rollout_id for d in ds)
            )

    def on(self, node_id: str) -> ModelRef | None:
        with self._lock:
            return self.models[node_id]

    def answer(self, mqtt: MqttClient, node_id: str, d: DesiredModel) -> None:
        """Worker thread: what a node whose store holds the bundle sends (node/updater.py):
        `pending`, `verifying`, `activating`, its new status, `active`; `active` alone if
        it already runs it."""
        if not self.answer_desired:
            return
        if self.answer_delay_s:
            time.sleep(self.answer_delay_s)
        m = d.model
        want = ModelRef(name=m.name, version=m.version, manifest_sha256=m.manifest_sha256)

        def report(state: UpdateState, progress: float) -> None:
            r = UpdateReport(
                rollout_id=d.rollout_id, model=m, state=state, progress=progress, ts=utcnow()
            )
            mqtt.publish(T.update(node_id), r.to_json(), qos=1)

        if self.on(node_id) != want:
            report(UpdateState.PENDING, 0.0)
            report(UpdateState.VERIFYING, 1.0)
            report(UpdateState.ACTIVATING, 1.0)
            with self._lock:
                self.models[node_id] = want
            mqtt.publish(T.status(node_id), self.status(node_id).to_json(), qos=1, retain=True)
        report(UpdateState.ACTIVE, 1.0)
        with self._lock:
            self.answered += 1
