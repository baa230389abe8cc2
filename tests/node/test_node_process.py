"""`cellwatch-node run` as a real process: startup errors, SIGTERM, SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from cellwatch.shared.schemas import NodeStatus, Result
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.helpers.nodes import NODE, start_node, wait_online, write_config


def test_sigterm_finishes_in_flight_and_exits_zero(
    tmp_path: Path, broker: Broker, toy_bundle: tuple[Path, Path], requester: Requester
) -> None:
    cfg = write_config(tmp_path, broker, *toy_bundle)
    watch = Collector(broker.settings("hub"), T.status("node-1"))
    proc = start_node(cfg, tmp_path / "node.log")
    try:
        wait_online(watch, 1)
        # The direct topic: what the node has not taken when it stops waits in its
        # session. (Shared-topic images published after its stop began would go to no
        # one here, there being one node: the lab client's retry covers that case.)
        direct = T.node_lab_images("node-1", "client")
        corrs = [requester.send(images.jpeg(), topic=direct) for _ in range(40)]
        wait_for(lambda: requester.count() >= 3, what="first results")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "node.log").read_text()
        last = NodeStatus.model_validate_json(watch.on(T.status("node-1"))[-1].payload)
        assert last.state == "offline"
        answered_before_restart = requester.count()
        # whatever was not answered stayed queued in the persistent session
        proc = start_node(cfg, tmp_path / "node2.log")
        for c in corrs:
            assert requester.result(c, timeout=60).status == "ok"
        assert answered_before_restart >= 3
    finally:
        proc.terminate()
        proc.wait(60)
        watch.close()


def test_sigkill_loses_no_image(
    tmp_path: Path, broker: Broker, toy_bundle: tuple[Path, Path], requester: Requester
) -> None:
    cfg = write_config(tmp_path, broker, *toy_bundle)
    watch = Collector(broker.settings("hub"), T.status("node-1"))
    proc = start_node(cfg, tmp_path / "node.log")
    try:
        wait_online(watch, 1)
        corrs = [requester.send(images.jpeg(), image_id=f"img-{i}") for i in range(60)]
        wait_for(lambda: requester.count() >= 5, what="first results")
        proc.kill()  # no graceful stop: unacknowledged images must be redelivered
        proc.wait(30)
        wait_for(
            lambda: (
                NodeStatus.model_validate_json(watch.on(T.status("node-1"))[-1].payload).state
                == "offline"
            ),
            30,
            "Will",
        )
        proc = start_node(cfg, tmp_path / "node2.log")
        for i, c in enumerate(corrs):
            r = requester.result(c, timeout=60)
            assert r.status == "ok" and r.image_id == f"img-{i}"
    finally:
        proc.terminate()
        proc.wait(60)
        watch.close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_startup_refuses_tampered_or_unsigned_bundle(
    tmp_path: Path, broker: Broker, toy_bundle: tuple[Path, Path]
) -> None:
    bundle, keys = toy_bundle
    bad = shutil.copytree(bundle, tmp_path / "bad")
    (bad / "golden.npz").write_bytes((bad / "golden.npz").read_bytes() + b"x")
    cfg = write_config(tmp_path, broker, bad, keys)
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 2 and "golden.npz: size" in r.stderr and "Traceback" not in r.stderr
    (bad / "golden.npz").write_bytes(bundle.joinpath("golden.npz").read_bytes())
    (bad / "manifest.sig").unlink()
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 2 and "unsigned bundles are not allowed" in r.stderr


def test_startup_errors_are_one_clear_line(
    tmp_path: Path, broker: Broker, toy_bundle: tuple[Path, Path]
) -> None:
    cfg = write_config(tmp_path, broker, *toy_bundle)
    r = run_cli("run", "--config", str(cfg), env={"CELLWATCH_INFERENCE__DEVICE": "GPU"})
    assert r.returncode == 2 and "'GPU' is not available; devices present: CPU" in r.stderr
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    r = run_cli("run", "--config", str(cfg), env={"CELLWATCH_MQTT__PASSWORD_FILE": str(wrong)})
    assert r.returncode == 2 and "refused the connection: Not authorized" in r.stderr, r.stderr
    r = run_cli("run", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_classify_and_devices_commands(tmp_path: Path, toy_bundle: tuple[Path, Path]) -> None:
    bundle, keys = toy_bundle
    (tmp_path / "red.jpg").write_bytes(images.jpeg(images.RED))
    (tmp_path / "blue.tif").write_bytes(images.tiff16(images.BLUE))
    (tmp_path / "notes.txt").write_bytes(images.TEXT)
    r = run_cli(
        "classify",
        str(tmp_path / "red.jpg"),
        str(tmp_path / "blue.tif"),
        str(tmp_path / "notes.txt"),
        "--bundle",
        str(bundle),
        "--trusted-keys",
        str(keys),
        "--device",
        "CPU",
    )
    results = [Result.model_validate_json(line) for line in r.stdout.splitlines()]
    assert [(x.image_id, x.label) for x in results[:2]] == [("red", "ALL"), ("blue", "normal")]
    assert results[2].error is not None and results[2].error.code == "unsupported_format"
    assert r.returncode == 1  # one input failed
    r = run_cli("devices")
    assert r.returncode == 0 and r.stdout.startswith("CPU")


def test_startup_refuses_a_bundle_that_fails_its_self_test(
    tmp_path: Path, broker: Broker, toy_bundle: tuple[Path, Path]
) -> None:
    from tests.models import write_test_bundle

    _, keys = toy_bundle
    broken = write_test_bundle(tmp_path / "broken", keys, golden_shift=0.5)
    cfg = write_config(tmp_path, broker, broken, keys)
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 2 and "self-test failed" in r.stderr, r.stderr
