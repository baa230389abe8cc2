"""End-to-end delivery under faults: a node killed with SIGKILL mid-batch, the
broker restarting mid-batch. Every image must be answered exactly once to the
caller; lost, duplicated and late answers are counted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from cellwatch.shared.schemas import NodeStatus
from tests import images
from tests.broker import Broker
from tests.client.conftest import BIN, ClientFactory, client_toml, node_toml
from tests.harness import Collector, T, wait_for
from tests.node.conftest import NodeFactory

NODE_SESSION_EXPIRY_S = 4
"""The nodes' session expiry here: a dead node's session (and its share of the
shared subscription) goes away this long after it died."""


def start_node(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "cellwatch-node"), "run", "--config", str(cfg)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def test_a_node_killed_mid_batch_every_image_is_answered_by_retry(
    broker: Broker, toy_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    watch = Collector(broker.settings("hub"), T.node_filter("status"))
    procs = {
        node: start_node(
            node_toml(broker, toy_bundle, tmp_path, node, session_expiry_s=NODE_SESSION_EXPIRY_S),
            tmp_path / f"{node}.log",
        )
        for node in ("node-1", "node-2")
    }
    folder = tmp_path / "batch"
    folder.mkdir()
    slow = images.png(images.RED, h=1200, w=1600)  # a few ms to decode: a batch takes time
    for i in range(120):
        (folder / f"img-{i:03d}.png").write_bytes(slow)
    cfg = client_toml(
        broker, tmp_path / "client.toml", timeout_s=120.0, retry_after_s=3.0, max_attempts=40
    )
    try:

        def online(node: str) -> bool:
            msgs = watch.on(T.status(node))
            return bool(msgs) and NodeStatus.model_validate_json(msgs[-1].payload).state == "online"

        wait_for(lambda: online("node-1") and online("node-2"), 60, "both nodes online")
        argv = ["classify", str(folder), "--config", str(cfg), "--json", "--concurrency", "32"]
        lines: list[dict[str, object]] = []
        killed = False
        with subprocess.Popen(
            [str(BIN / "cellwatch-client"), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as cli:
            assert cli.stdout is not None and cli.stderr is not None
            for raw in cli.stdout:
                lines.append(json.loads(raw))
                by_node = Counter(
                    r["node_id"] for x in lines if isinstance(r := x.get("result"), dict)
                )
                if not killed and by_node["node-1"] >= 10:
                    procs["node-1"].kill()  # SIGKILL: its share waits in its session
                    killed = True
            stderr = cli.stderr.read()
        assert cli.returncode == 0, stderr
        assert killed, "the batch ended before node-1 answered 10 images"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(30)
        watch.close()
    inputs = Counter(str(x["input"]) for x in lines)
    assert len(inputs) == 120 and set(inputs.values()) == {1}  # each answered exactly once
    assert {x["status"] for x in lines} == {"ok"}
    retried = [x for x in lines if int(str(x["attempts"])) > 1]
    assert retried, "the dead node's share should have needed a retry"
    # the summary shows the retries: "publishes: N (R retries for K images)"
    m = re.search(r"publishes: (\d+) \((\d+) retries for (\d+) images\)", stderr)
    assert m is not None, stderr
    assert int(m.group(2)) >= len(retried) > 0 and int(m.group(3)) == len(retried)
    lost = 120 - len(inputs)
    dropped = re.search(r"dropped: (\d+) duplicates, (\d+) late", stderr)
    assert dropped is not None
    print(
        f"kill -9: lost {lost}, retried {len(retried)}, duplicates dropped "
        f"{dropped.group(1)}, late dropped {dropped.group(2)}",
        file=sys.stderr,
    )


def test_the_broker_restarting_mid_batch_every_image_is_answered_once(
    broker: Broker, node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    node_factory()
    client = client_factory(timeout_s=120.0, retry_after_s=10.0, max_attempts=12)
    batch = [images.png(images.BLUE, h=600, w=800)] * 150
    answers = []
    restarted = threading.Event()
    for answer in client.classify_many(batch, concurrency=16):
        answers.append(answer)
        if len(answers) == 30:
            broker.restart()  # clients and node reconnect to the same sessions
            restarted.set()
    assert restarted.is_set()
    inputs = Counter(a.input for a in answers)
    assert inputs == Counter(f"bytes#{i}" for i in range(150))  # none lost, none twice
    assert all(a.ok for a in answers), Counter(a.status for a in answers)
    stats = client.stats()
    print(
        f"broker restart: lost 0, retries {stats.retries}, duplicates dropped "
        f"{stats.duplicates}, late dropped {stats.late}",
        file=sys.stderr,
    )
