"""The labelling round trip as an operator and a labeller run it (issue 20): a node
process sends samples to a hub process; `cellwatch-hub samples list/export/import` as
subprocesses; the exported directory is the field directory training reads."""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.shared.samples import SAMPLES_CSV, read_samples, sample_id
from tests.broker import Broker
from tests.harness import Requester, wait_for
from tests.helpers.hubcli import cli
from tests.images import RED, encode, png
from tests.security.stack import Boots, Stack

GREYS = [(120, 120, 120), (124, 124, 124)]


def listed(broker: Broker, *args: str) -> dict[str, Any]:
    proc = cli(broker, "samples", "list", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def rows_of(table: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(table.read_text())))


def write_rows(table: Path, rows: list[dict[str, str]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    table.write_text(out.getvalue())


def problems(proc: object) -> list[str]:
    """The stderr lines of a refused import (exit 2, no traceback)."""
    assert getattr(proc, "returncode", None) == 2, proc
    err: str = getattr(proc, "stderr", "")
    assert "Traceback" not in err
    return err.strip().splitlines()


def test_export_label_import_round_trip_and_bad_imports(
    stack: Stack, broker: Broker, requester: Requester, tmp_path: Path
) -> None:
    hub = stack.hub(tmp_path / "hub-data")
    hub.start()
    spool = tmp_path / "spool"
    node = stack.node(
        "node-1",
        extra=(
            '[samples]\nenabled = true\nsources = ["client"]\nrandom_share = 0.0\n'
            f'spool_dir = "{spool}"\nretry_s = 0.5\n'
        ),
    )
    boots = Boots(broker, "node-1")
    node.start()
    boots.wait_online(1)
    boots.close()
    images = [png(g, 120, 160) for g in GREYS] + [png(RED, 120, 160)]  # 2 low confidence
    for i, payload in enumerate(images):
        assert requester.result(requester.send(payload, image_id=f"f{i}"), 60).status == "ok"
    wait_for(lambda: len(listed(broker)["samples"]) == 2, 60, "two samples at the hub")

    data = listed(broker, "--reason", "low_confidence", "--source", "client")
    samples = data["samples"]
    assert isinstance(samples, list) and len(samples) == 2
    assert data["labels"] == ["normal", "ALL"]
    assert data["counts"] == [
        {"reason": "low_confidence", "source": "client", "samples": 2, "labelled": 0}
    ]
    assert listed(broker, "--reason", "random")["samples"] == []
    assert listed(broker, "--source", "client-labA")["samples"] == []
    page = urllib.request.urlopen(f"http://127.0.0.1:{hub.http_port}/", timeout=30).read()
    card = re.search(r'<div class="card samples">(.*?)</section>', page.decode(), re.S)
    assert card is not None
    assert re.search(r'<div class="big">2</div>.*labelled 0', card.group(1), re.S)
    assert "low_confidence · client 2" in card.group(1)
    text = cli(broker, "samples", "list")
    assert text.returncode == 0 and "low_confidence" in text.stdout, text

    out = tmp_path / "field"
    exported = cli(broker, "samples", "export", str(out))
    assert exported.returncode == 0, exported.stderr
    assert f"exported 2 samples to {out}" in exported.stdout
    table = out / SAMPLES_CSV
    rows = rows_of(table)
    assert [r["label"] for r in rows] == ["", ""]
    assert {r["reason"] for r in rows} == {"low_confidence"}
    for r in rows:
        assert sample_id((out / f"{r['id']}.png").read_bytes()) == r["id"]
    tasks = json.loads((out / "label-studio.json").read_text())
    assert [t["data"]["sample_id"] for t in tasks] == [r["id"] for r in rows]
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"] == "toy@1.0.0"
    assert prediction["result"][0]["value"]["choices"] == [rows[0]["predicted"]]
    assert '<Choice value="ALL"/>' in (out / "label-studio.xml").read_text()
    again = cli(broker, "samples", "export", str(out))
    assert problems(again)[-1].startswith("error: ") and "exists" in again.stderr

    # bad CSVs: each reported, nothing imported
    good = [dict(r, label=lab) for r, lab in zip(rows, ["ALL", "normal"], strict=True)]
    write_rows(table, [dict(good[0], label="blast"), good[1]])
    lines = problems(cli(broker, "samples", "import", str(table)))
    assert lines == [
        "samples.csv: line 2: unknown label 'blast' (known: normal, ALL)",
        f"error: 1 problem in {table}: nothing imported",
    ]
    write_rows(table, [good[0], good[1], good[0]])
    lines = problems(cli(broker, "samples", "import", str(table)))
    assert lines[0] == f"samples.csv: line 4: id {rows[0]['id'][:12]}... repeats line 2"
    assert lines[-1] == f"error: 1 problem in {table}: nothing imported"
    stranger = encode(np.full((8, 8, 3), 7, np.uint8), ".png")  # an image the hub lacks
    (out / f"{sample_id(stranger)}.png").write_bytes(stranger)
    write_rows(table, [*good, dict(good[0], id=sample_id(stranger))])
    lines = problems(cli(broker, "samples", "import", str(table)))
    assert lines == [
        f"samples.csv: line 4: sample {sample_id(stranger)[:12]}... is not one the hub has",
        f"error: 1 problem in {table}: nothing imported",
    ]
    (out / f"{sample_id(stranger)}.png").unlink()
    assert all(s["label"] is None for s in listed(broker)["samples"])

    # a Label Studio export with every kind of problem at once
    def task(sample: str, choice: str | None) -> dict[str, object]:
        result = [{"type": "choices", "value": {"choices": [choice]}}] if choice else []
        return {"data": {"sample_id": sample}, "annotations": [{"result": result}]}

    ls = tmp_path / "export.json"
    ls.write_text(
        json.dumps(
            [
                task(rows[0]["id"], "blast"),
                task(rows[1]["id"], None),
                task(rows[1]["id"], "ALL"),
                task("ab" * 32, "normal"),
            ]
        )
    )
    lines = problems(cli(broker, "samples", "import", str(ls)))
    assert lines == [
        "export.json: task 1: unknown label 'blast' (known: normal, ALL)",
        "export.json: task 2: no label (label it normal or ALL)",
        f"export.json: task 3: sample {rows[1]['id'][:12]}... repeats an earlier task",
        f"export.json: task 4: sample {'ab' * 6}... is not one the hub has",
        f"error: 4 problems in {ls}: nothing imported",
    ]

    # the labeller's filled CSV: imported, and the directory is training's field directory
    write_rows(table, good)
    done = cli(broker, "samples", "import", str(table))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imported 2 labels from {table}"
    assert {s["id"]: s["label"] for s in listed(broker)["samples"]} == {
        r["id"]: r["label"] for r in good
    }
    field = read_samples(out, ["normal", "ALL"])
    assert sorted(r.label or "" for r in field.rows) == ["ALL", "normal"]
    counts = listed(broker)["counts"]
    assert counts == [{"reason": "low_confidence", "source": "client", "samples": 2, "labelled": 2}]
    # a Label Studio export of the same labels imports too
    ls.write_text(json.dumps([task(r["id"], r["label"]) for r in good]))
    assert cli(broker, "samples", "import", str(ls)).returncode == 0
