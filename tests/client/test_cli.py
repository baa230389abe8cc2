"""`cellwatch-client classify` as a real process: output, summary and exit codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cellwatch.shared.limits import BROKER_MAX_PACKET_BYTES
from tests import images
from tests.broker import Broker
from tests.client.conftest import client_toml, run_client
from tests.node.conftest import NodeFactory


def folder_of_images(root: Path) -> Path:
    root.mkdir()
    for i in range(3):
        (root / f"red-{i}.jpg").write_bytes(images.jpeg(images.RED, 48, 64))
    (root / "blue.png").write_bytes(images.png(images.BLUE, 48, 64))
    (root / "readme.txt").write_bytes(images.TEXT)  # not an image name: not picked up
    return root


def test_all_ok_exits_0_with_json_lines_and_a_summary(
    broker: Broker, node_factory: NodeFactory, tmp_path: Path
) -> None:
    node_factory()
    cfg = client_toml(broker, tmp_path / "client.toml")
    folder = folder_of_images(tmp_path / "smears")
    r = run_client("classify", str(folder), "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(Path(x["input"]).name for x in lines) == [
        "blue.png",
        "red-0.jpg",
        "red-1.jpg",
        "red-2.jpg",
    ]
    assert {x["status"] for x in lines} == {"ok"}
    labels = {Path(x["input"]).name: x["result"]["label"] for x in lines}
    assert labels["blue.png"] == "normal" and labels["red-0.jpg"] == "ALL"
    assert "4 images: 4 ok" in r.stderr and "labels: ALL 3, normal 1" in r.stderr
    assert "round trip: p50" in r.stderr and "(n=4," in r.stderr
    assert "publishes: 4 (0 retries for 0 images); dropped: 0 duplicates" in r.stderr


def test_some_failed_exits_1_and_reports_each_file(
    broker: Broker, node_factory: NodeFactory, tmp_path: Path
) -> None:
    node_factory()
    cfg = client_toml(broker, tmp_path / "client.toml")
    good = tmp_path / "good.jpg"
    good.write_bytes(images.jpeg())
    notes = tmp_path / "notes.txt"
    notes.write_bytes(images.TEXT)
    huge = tmp_path / "huge.tif"
    huge.write_bytes(b"II*\x00" + bytes(BROKER_MAX_PACKET_BYTES))
    out = tmp_path / "out.csv"
    r = run_client(
        "classify", str(good), str(notes), str(huge), "--config", str(cfg), "--csv", str(out)
    )
    assert r.returncode == 1, r.stderr
    rows = {Path(row["input"]).name: row for row in csv.DictReader(out.open())}
    assert rows["good.jpg"]["status"] == "ok" and rows["good.jpg"]["label"] == "ALL"
    assert rows["notes.txt"]["status"] == "unsupported_format"
    assert rows["huge.tif"]["status"] == "payload_too_large"
    assert "maximum packet size" in rows["huge.tif"]["error"]
    assert "errors: payload_too_large 1, unsupported_format 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_usage_connection_and_authorisation_errors_exit_2_with_one_line(
    broker: Broker, tmp_path: Path
) -> None:
    cfg = client_toml(broker, tmp_path / "client.toml")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_bytes(images.TEXT)
    image = tmp_path / "x.jpg"
    image.write_bytes(images.jpeg())
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    hub = client_toml(broker, tmp_path / "hub.toml", user="hub")
    cases = {
        "does not exist": ["classify", str(tmp_path / "missing.jpg"), "--config", str(cfg)],
        "has no images": ["classify", str(tmp_path / "empty"), "--config", str(cfg)],
        "refused the connection": [
            "classify",
            str(image),
            "--config",
            str(cfg),
            "--password-file",
            str(wrong),
        ],
        "connection refused": ["classify", str(image), "--config", str(cfg), "--port", "1"],
        "refused images on cellwatch/images/hub from user 'hub'": [
            "classify",
            str(image),
            "--config",
            str(hub),
        ],
        "exclude each other": [
            "classify",
            str(image),
            "--config",
            str(cfg),
            "--json",
            "--csv",
            str(tmp_path / "x.csv"),
        ],
        "config file": ["classify", str(image), "--config", str(tmp_path / "none.toml")],
    }
    for expected, argv in cases.items():
        r = run_client(*argv)
        assert r.returncode == 2, (expected, r.returncode, r.stderr)
        assert expected in r.stderr, (expected, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert run_client("classify", "--help").returncode == 0
