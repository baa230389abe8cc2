"""deploy/site_conf.py: the site broker's bridge forwards exactly what DESIGN.md's Sites
section names, and its check catches a bridge that forwards more; mkacl.sh writes the
bridge's and the relay's accounts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import DEPLOY, MOSQUITTO_CONF, run_script
from tests.sites.topology import site_conf

PASSWORD = "s3cret-bridge"


def rendered(relays: tuple[str, ...] = ()) -> str:
    return MOSQUITTO_CONF.read_text() + site_conf.bridge_section(
        "lab-a", ("central.example", 8883), PASSWORD, relays=relays
    )


def topic_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("topic ")}


def test_the_bridge_forwards_control_traffic_only() -> None:
    text = rendered()
    assert topic_lines(text) == {
        "topic cellwatch/nodes/+/status out 1",
        "topic cellwatch/nodes/+/telemetry out 0",
        "topic cellwatch/nodes/+/update out 1",
        "topic cellwatch/nodes/+/shadow-report out 1",
        "topic cellwatch/hub/fetch/+ out 1",
        "topic cellwatch/nodes/+/desired in 1",
        "topic cellwatch/nodes/+/shadow in 1",
        "topic cellwatch/hub/revoked in 1",
        "topic cellwatch/nodes/+/fetch in 1",
        "topic cellwatch/hub/samples/+/+ out 1",
        "topic cellwatch/nodes/+/samples in 1",
    }
    for needed in (
        "connection cellwatch-lab-a",
        "bridge_protocol_version mqttv50",
        "remote_username bridge-lab-a",
        "cleansession false",
        "notifications true",
        "notification_topic cellwatch/sites/lab-a/bridge",
    ):
        assert needed in text.splitlines(), needed
    # The client ids carry a secret only the password's holder can compute.
    remote = next(line for line in text.splitlines() if line.startswith("remote_clientid"))
    assert (
        remote.startswith("remote_clientid cellwatch-lab-a-") and len(remote.split("-")[-1]) == 32
    )
    assert site_conf.check(text) == []


def test_with_a_relay_the_nodes_fetches_stay_at_the_site() -> None:
    text = rendered(("relay-a",))
    lines = topic_lines(text)
    assert "topic cellwatch/hub/fetch/+ out 1" not in lines
    assert "topic cellwatch/nodes/+/fetch in 1" not in lines
    assert {
        "topic cellwatch/hub/fetch/relay-a out 1",
        "topic cellwatch/nodes/relay-a/fetch in 1",
    } <= lines
    assert site_conf.check(text) == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("topic cellwatch/# out 1", "forwards too much: it would carry images"),
        ("topic # both 1", "forwards too much"),
        ("topic cellwatch/images/+/+ out 1", "it would carry images"),
        ("topic cellwatch/nodes/+/images/# out 1", "images to one node"),
        ("topic cellwatch/results/+ out 1", "Results"),
        ("topic cellwatch/replies/# out 1", "Results on Response Topics"),
        ("topic cellwatch/nodes/+/+ out 1", "images to one node"),
        ("topic cellwatch/nodes/+/status in 1", "is not a topic a site forwards"),
        ("topic cellwatch/nodes/+/status both 1", "forwards both ways"),
        ("topic status out 1 cellwatch/nodes/node-1/ cellwatch/nodes/node-1/", "remaps topics"),
    ],
)
def test_the_check_catches_a_bridge_that_forwards_too_much(line: str, expected: str) -> None:
    problems = site_conf.check(rendered() + line + "\n")
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_check_catches_node_fetches_beside_a_relay() -> None:
    text = rendered(("relay-a",)) + "topic cellwatch/hub/fetch/+ out 1\n"
    (problem,) = site_conf.check(text)
    assert "forwards the nodes' fetch topics and has a relay (relay-a)" in problem


def test_the_check_wants_the_link_notification() -> None:
    text = rendered().replace("notification_topic cellwatch/sites/lab-a/bridge\n", "")
    (problem,) = site_conf.check(text)
    assert "notification_topic cellwatch/sites/SITE/bridge" in problem


def test_check_and_render_from_the_command_line(tmp_path: Path) -> None:
    password = tmp_path / "bridge.password"
    password.write_text(PASSWORD + "\n")
    out = tmp_path / "site.conf"
    script = str(DEPLOY / "site_conf.py")
    render = [sys.executable, script, "render", "--src", str(MOSQUITTO_CONF), "--site", "lab-a"]
    made = subprocess.run(
        [*render, "--central", "central:8883", "--password-file", str(password), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert out.stat().st_mode & 0o077 == 0  # it holds the bridge's password
    good = subprocess.run(
        [sys.executable, script, "check", str(out)], capture_output=True, text=True, check=False
    )
    assert good.returncode == 0, good.stderr
    out.write_text(out.read_text() + "topic cellwatch/# out 1\n")
    bad = subprocess.run(
        [sys.executable, script, "check", str(out)], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert "topic cellwatch/# out: forwards too much" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_mkacl_writes_the_bridge_and_relay_accounts(tmp_path: Path) -> None:
    run_script("mkacl.sh", "--bridge", "lab-a=node-1,relay-a", "--relay", "relay-a", str(tmp_path))
    run_script("mkacl.sh", "--bridge", "lab-b=node-2", str(tmp_path))  # kept, not replaced
    acl = (tmp_path / "acl").read_text()
    bridge_a = acl.split("user bridge-lab-a\n")[1].split("\n\n")[0].splitlines()
    assert "topic write cellwatch/sites/lab-a/bridge" in bridge_a
    assert "topic write cellwatch/nodes/node-1/status" in bridge_a
    assert "topic read cellwatch/nodes/node-1/desired" in bridge_a
    assert "topic write cellwatch/hub/fetch/relay-a" in bridge_a
    assert "topic write cellwatch/hub/samples/node-1/#" in bridge_a
    assert "topic read cellwatch/nodes/node-1/samples" in bridge_a
    assert not any("node-2" in line or "images" in line or "results" in line for line in bridge_a)
    assert "user bridge-lab-b" in acl
    relay = acl.split("user relay-a\n")[1].split("\n\n")[0].splitlines()
    assert relay == [
        "topic read cellwatch/hub/fetch/+",
        "topic write cellwatch/nodes/+/fetch",
        "topic write cellwatch/hub/fetch/relay-a",
        "topic read cellwatch/nodes/relay-a/fetch",
        "topic read cellwatch/hub/revoked",
    ]
    assert "user hub\ntopic read cellwatch/sites/+/bridge\n" in acl
    bad = run_script("mkacl.sh", "--bridge", "lab-c", str(tmp_path), check=False)
    assert bad.returncode == 1 and "use SITE=ID" in bad.stderr
