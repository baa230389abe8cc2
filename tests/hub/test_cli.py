"""`cellwatch-hub` as a user runs it: subprocesses against the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from cellwatch.shared.states import UpdateState
from tests.broker import Broker, free_port
from tests.harness import wait_for
from tests.helpers.hubcli import HUB, cli, one_line_error
from tests.helpers.rollouts import fleet_on_v1
from tests.hub.conftest import Bundles, NodeMaker


@pytest.mark.usefixtures("hub")
def test_push_models_nodes(broker: Broker, bundles: Bundles, fake_nodes: NodeMaker) -> None:
    first = cli(broker, "push", str(bundles.v1))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("stored toy 1.0.0 (")
    again = cli(broker, "push", str(bundles.v1))
    assert again.returncode == 0 and "already on the hub: nothing to do" in again.stdout
    models = json.loads(cli(broker, "models", "--json").stdout)["models"]
    assert [(m["name"], m["version"]) for m in models] == [("toy", "1.0.0")]
    table = cli(broker, "models").stdout
    assert "toy" in table and "1.0.0" in table and bundles.sha(bundles.v1)[:12] in table
    fake_nodes("node-1", tags=("ward-a",))
    wait_for(lambda: "node-1" in cli(broker, "nodes").stdout, what="node-1 listed")
    nodes = json.loads(cli(broker, "nodes", "--json").stdout)["nodes"]
    assert nodes[0]["node_id"] == "node-1" and nodes[0]["tags"] == ["ward-a"]


def test_errors_are_one_line(broker: Broker, bundles: Bundles, tmp_path: Path) -> None:
    # No hub running.
    one_line_error(cli(broker, "models", timeout=1), "no answer from the hub within 1 s")
    # No broker there.
    proc = subprocess.run(
        [HUB, "models", "--port", str(free_port()), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CELLWATCH_MQTT__CONNECT_TIMEOUT_S": "2"},
    )
    one_line_error(proc, "localhost:")
    # A bundle with an extra file, and one that does not exist.
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in bundles.v1.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "run.sh").write_text("rm -rf /\n")
    one_line_error(cli(broker, "push", str(bad)), "run.sh", "not allowed")
    missing = cli(broker, "push", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.usefixtures("hub")
def test_errors_from_the_hub_and_the_broker(broker: Broker, bundles: Bundles) -> None:
    one_line_error(cli(broker, "rollout", "start", "toy", "9.9.9"), "no model toy 9.9.9")
    one_line_error(cli(broker, "push", str(bundles.untrusted)), "not match any trusted key")
    one_line_error(cli(broker, "rollout", "status", "r42"), "no rollout")
    one_line_error(cli(broker, "models", user="client"), "refused", "only the operator")
    one_line_error(cli(broker, "models", user="node-1"), "refused")
    wrong = broker.dir / "wrong.password"
    wrong.write_text("not-the-password\n")
    proc = subprocess.run(
        [HUB, "models", "--port", str(broker.port), "--password-file", str(wrong)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    one_line_error(proc, "refused the connection")


def test_serve_killed_mid_rollout_resumes_and_watch_follows_it(
    broker: Broker, bundles: Bundles, fake_nodes: NodeMaker, tmp_path: Path
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "hub"}"\n'
        f'trusted_keys = "{bundles.keys}"\n'
        "tick_s = 0.2\n"
        "[mqtt]\n"
        f'host = "{broker.host}"\n'
        f"port = {broker.port}\n"
        f'password_file = "{broker.dir / "secrets" / "hub.password"}"\n'
        "[http]\n"
        'listen = "127.0.0.1:0"\n'
    )
    log = (tmp_path / "hub.log").open("w")

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [HUB, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )

    hub = serve()
    try:
        n1, n2, n3 = fleet_on_v1(bundles, fake_nodes, behaviour="manual")
        wait_for(lambda: cli(broker, "nodes").stdout.count("online") == 3, 30, "3 nodes")
        assert cli(broker, "push", str(bundles.v2)).returncode == 0
        start = cli(broker, "rollout", "start", "toy", "2.0.0", "--waves", "1,100%", "--json")
        assert start.returncode == 0, start.stderr
        rid = json.loads(start.stdout)["rollout_id"]
        wait_for(lambda: len(n1.desired) == 1, what="canary desired")
        n1.report(n1.desired[0], UpdateState.ACTIVE, 1.0)
        wait_for(lambda: len(n2.desired) == 1 and len(n3.desired) == 1, what="wave 2")
        hub.kill()  # SIGKILL: no clean shutdown
        hub.wait()
        n2.report(n2.desired[0], UpdateState.ACTIVE, 1.0)
        hub = serve()
        watch = subprocess.Popen(
            [
                HUB,
                *("rollout", "status", rid, "--watch", "--json", "--interval", "0.2"),
                *("--port", str(broker.port)),
                *("--password-file", str(broker.dir / "secrets" / "operator.password")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def node2_active() -> bool:
            status = cli(broker, "rollout", "status", rid, "--json")
            if status.returncode != 0:
                return False  # the hub is still starting
            targets = json.loads(status.stdout)["targets"]
            return any(t["node_id"] == "node-2" and t["state"] == "active" for t in targets)

        wait_for(node2_active, 30, "the restarted hub to take node-2's report")
        n3.report(n3.desired[0], UpdateState.ACTIVE, 1.0)
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[-1]["state"] == "completed"
        assert [t["state"] for t in lines[-1]["targets"]] == ["active"] * 3
        table = cli(broker, "rollout", "status", rid).stdout
        assert "completed" in table and "3 of 3 nodes active" in table
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(30) == 0
        log.close()
