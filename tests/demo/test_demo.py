"""`make demo`, shortened: `deploy/demo.py run --quick` as a subprocess (the same code
path as `make demo`: fewer images, one epoch), then `up` / `down` in its working
directory.

The run's facts come from WORKDIR/summary.json; "nothing left behind" is checked
against every PID the demo recorded and against /proc (no mosquitto or cellwatch
process with the working directory in its command line).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.broker import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "deploy" / "demo.py"
RUN_TIMEOUT_S = 540.0


@dataclass
class DemoRun:
    workdir: Path
    returncode: int
    output: str
    summary: dict[str, Any]


def demo(*args: str, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run deploy/demo.py; on timeout it gets SIGTERM (it cleans up) before failing."""
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"deploy/demo.py {' '.join(args)} took over {timeout:g} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def start_ticks(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def leftovers(workdir: Path) -> list[str]:
    """Live mosquitto/cellwatch processes whose command line names workdir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or start_ticks(int(entry.name)) is None:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmd and ("mosquitto" in cmd or "cellwatch" in cmd):
            found.append(f"{entry.name}: {cmd}")
    return found


def recorded_alive(summary: dict[str, Any]) -> list[str]:
    return [
        f"{p['name']} (pid {p['pid']})"
        for p in summary["processes"]
        if start_ticks(p["pid"]) == p["ticks"]
    ]


def fetch(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as reply:
        text: str = reply.read().decode()
        return text


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    workdir = tmp_path_factory.mktemp("demo") / "work"
    proc = demo(
        "run",
        "--quick",
        "--workdir",
        str(workdir),
        "--http-port",
        str(free_port()),
        timeout=RUN_TIMEOUT_S,
    )
    summary_file = workdir / "summary.json"
    assert summary_file.is_file(), f"no summary.json; the demo said:\n{proc.stdout[-6000:]}"
    run = DemoRun(workdir, proc.returncode, proc.stdout, json.loads(summary_file.read_text()))
    yield run
    demo("down", "--workdir", str(workdir), timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_quick_demo_succeeds_with_both_nodes(quick_run: DemoRun) -> None:
    s = quick_run.summary
    assert quick_run.returncode == 0 and s["ok"], (s["error"], quick_run.output[-6000:])
    assert s["quick"] is True
    assert s["fleet_url"].startswith("http://127.0.0.1:")
    assert f"fleet page (live, read-only): {s['fleet_url']}" in quick_run.output
    assert {"node-1", "node-2"} <= set(s["nodes_answered"])
    c = s["classify"]
    assert c["sent"] > 0 and c["answered"] == c["sent"] and c["failed"] == 0
    assert {"node-1", "node-2"} <= set(c["by_node"]), c
    assert set(c["by_version"]) == {s["versions"]["v1"]}
    assert 0.0 <= c["accuracy"] <= 1.0
    for phase in ("1 broker, credentials, signing key", "7b roll out v2 under load"):
        assert phase in s["phases_s"]
    for kind in ("plots", "metrics", "bundles", "logs"):
        assert s["paths"][kind], kind
        assert all(Path(p).exists() for p in s["paths"][kind])


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_second_rollout_under_load_loses_nothing(quick_run: DemoRun) -> None:
    s = quick_run.summary
    assert s["ok"], s["error"]
    swap, v1, v2 = s["swap"], s["versions"]["v1"], s["versions"]["v2"]
    assert swap["flowing_during_rollout"] is True
    assert swap["traffic_started_s"] < 0 < swap["all_nodes_switched_s"] < swap["traffic_stopped_s"]
    assert swap["answered_during_rollout"] > 0
    assert swap["sent"] > 0 and swap["answered"] == swap["sent"]
    assert swap["failed"] == 0 and swap["missing"] == 0, swap["errors"]
    # Results switched: some from v1, then v2; the last ones from v2.
    assert swap["by_version"].get(v1, 0) > 0 and swap["by_version"].get(v2, 0) > 0, swap
    assert swap["last_answer_version"] == v2
    assert swap["first_v2_answer_s"] is not None and swap["last_v1_answer_s"] is not None
    assert {"node-1", "node-2"} <= set(swap["by_node"])


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_field_samples_come_back_and_measure_both_versions(quick_run: DemoRun) -> None:
    """Step 6 and 7a: the field batch's samples reached the hub, every sample was
    labelled and imported, the batch split into two labelled halves, v2 trained with
    one, and both versions' figures on the other were printed."""
    s = quick_run.summary
    assert s["ok"], s["error"]
    f = s["field"]
    assert f["sent"] > 0 and f["answered"] == f["sent"]
    # at the hub: the batch's samples and step 5's; every one labelled and imported
    assert 2 <= f["field_samples"] <= min(f["sent"], f["samples_at_hub"]), f
    assert f["imported"] == f["samples_at_hub"], f
    assert f"imported {f['imported']} labels from" in quick_run.output
    assert sum(f["by_reason"].values()) == f["field_samples"]
    assert set(f["by_reason"]) <= {"random", "low_confidence"}, f["by_reason"]
    # two halves on disk, labelled from the generator's truth, disjoint
    assert f["train"] > 0 and f["held_out"] > 0
    assert f["train"] + f["held_out"] == f["field_samples"]
    halves = {}
    for name in ("train", "held-out"):
        with (quick_run.workdir / "field" / name / "samples.csv").open() as table:
            rows = list(csv.DictReader(table))
        assert {r["label"] for r in rows} <= {"normal", "ALL"}, rows
        halves[name] = {r["id"] for r in rows}
    assert len(halves["train"]) == f["train"] and len(halves["held-out"]) == f["held_out"]
    assert not halves["train"] & halves["held-out"]
    # v2 trained with the training half (all in its train split); both measured
    assert f["v2_split"]["train"] == sum(f["v2_split"].values()) == f["train"], f["v2_split"]
    assert set(f["evaluation"]) == {"v1", "v2"}
    for tag, ev in f["evaluation"].items():
        assert ev["version"] == s["versions"][tag]
        assert ev["per_reason"]["all"]["n"] + ev["excluded"] == f["held_out"], ev
        if ev["per_reason"]["all"]["n"]:
            assert ev["per_reason"]["all"]["accuracy"]["ci95"] is not None
    assert "held-out field samples" in quick_run.output
    for tag in ("v1", "v2"):
        assert f"{tag} ({s['versions'][tag]})" in quick_run.output
    assert f"cellwatch-train evaluate {quick_run.workdir}/runs/v2 --field" in quick_run.output
    assert "only `random` samples give an unbiased estimate" in quick_run.output
    assert "6 field samples come back" in s["phases_s"]


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_demo_leaves_no_process_behind(quick_run: DemoRun) -> None:
    s = quick_run.summary
    names = {p["name"] for p in s["processes"]}
    assert {"mosquitto", "hub", "node-1", "node-2"} <= names
    assert s["exit_codes"] and all(code == 0 for code in s["exit_codes"].values()), s["exit_codes"]
    assert recorded_alive(s) == []
    assert leftovers(quick_run.workdir) == []
    assert not (quick_run.workdir / "pids").exists()


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_up_and_down_in_the_demo_workdir(quick_run: DemoRun) -> None:
    workdir = quick_run.workdir
    http_port = free_port()
    up = demo(
        "up",
        "--workdir",
        str(workdir),
        "--port",
        str(free_port()),
        "--tls-port",
        str(free_port()),
        "--http-port",
        str(http_port),
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stdout[-6000:]
        assert "make down" in up.stdout
        assert "mosquitto_pub" in up.stdout
        url = f"http://127.0.0.1:{http_port}/"
        assert f"Fleet page (live, read-only): {url}" in up.stdout
        # what the README says to try during `make up`
        deadline = time.monotonic() + 30
        while "cellwatch_node_up{model_version=" not in (metrics := fetch(f"{url}metrics")):
            assert time.monotonic() < deadline, metrics[-3000:]
            time.sleep(0.5)
        assert 'node_id="node-1"' in metrics
        assert 'data-node="node-1"' in fetch(url)
        pids = (workdir / "pids").read_text().split("\n")
        running = {line.split()[2] for line in pids if line.strip()}
        assert {"mosquitto", "hub", "node-1"} <= running
        assert leftovers(workdir), "`up` returned but nothing runs"
        listing = next(line for line in up.stdout.splitlines() if line.endswith("samples list"))
        env = {**os.environ, "CELLWATCH_HUB_CLIENT_CONFIG": str(workdir / "hub/operator.toml")}

        def samples() -> int:
            r = subprocess.run(
                ["bash", "-c", listing + " --json"],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            return len(json.loads(r.stdout)["samples"])

        before = samples()
        # The lab client example `up` prints works as printed.
        example = next(line for line in up.stdout.splitlines() if "cellwatch-client " in line)
        assert f"classify {workdir}/data/*.tif --config {workdir}/client.toml --json" in example
        r = subprocess.run(
            ["bash", "-c", example], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr
        answers = [json.loads(line) for line in r.stdout.splitlines()]
        tifs = sorted((workdir / "data").glob("*.tif"))
        assert sorted(Path(a["input"]).name for a in answers) == [p.name for p in tifs]
        assert {a["status"] for a in answers} == {"ok"}
        assert f"{len(tifs)} images: {len(tifs)} ok" in r.stderr
        # node-1 keeps samples of the `client` account: the list `up` prints grows (the
        # training images were never sent in the run; the same pixels are one sample)
        deadline = time.monotonic() + 60
        while samples() <= before:
            assert time.monotonic() < deadline, "no new sample reached the hub"
            time.sleep(0.5)
    finally:
        down = demo("down", "--workdir", str(workdir), timeout=120)
    assert down.returncode == 0, down.stdout
    deadline = time.monotonic() + 10
    while leftovers(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(workdir) == []


def running_command(workdir: Path, name: str, proc: subprocess.Popen[str]) -> tuple[int, int]:
    """(pid, start ticks) of the demo's command `name` once WORKDIR/pids lists it alive."""
    pidfile = workdir / "pids"
    while proc.poll() is None:
        for line in pidfile.read_text().splitlines() if pidfile.exists() else []:
            pid, ticks, who = line.split()
            if who == name and start_ticks(int(pid)) == int(ticks):
                return int(pid), int(ticks)
        time.sleep(0.05)
    pytest.fail(f"the demo ended before {name} ran")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interrupted_demo_stops_everything(tmp_path: Path) -> None:
    """Ctrl-C while a training command runs (once the nodes are up): exit 130, that
    command and every service stopped, nothing left running."""
    workdir, log = tmp_path / "work", tmp_path / "demo.out"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(DEMO), "run", "--quick", "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
    try:
        fit_pid, fit_ticks = running_command(workdir, "train-fit-v1", proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == 130, output[-6000:]
    assert start_ticks(fit_pid) != fit_ticks, "the training command outlived the demo"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["ok"] is False and "interrupted" in summary["error"]
    names = {p["name"] for p in summary["processes"]}
    assert {"mosquitto", "hub", "node-1", "node-2", "train-fit-v1"} <= names
    assert recorded_alive(summary) == []
    assert leftovers(workdir) == []


def test_make_targets_run_the_demo_script() -> None:
    """`make demo` / `make up` / `make down` are thin wrappers of deploy/demo.py (and,
    with SITES=N, of deploy/sites.py)."""
    make = shutil.which("make")
    assert make is not None, "make is needed (apt-get install make)"

    def dry_run(*args: str) -> str:
        proc = subprocess.run(
            [make, "-n", *args], cwd=REPO, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "deploy/demo.py run --workdir demo-work --checkpoint /ck/inception_v3.ckpt" in dry_run(
        "demo", "CHECKPOINT=/ck/inception_v3.ckpt"
    )
    assert "deploy/demo.py run --workdir demo-work" in dry_run("demo")
    assert "--checkpoint" not in dry_run("demo")
    assert "deploy/demo.py up --workdir demo-work" in dry_run("up")
    assert "deploy/demo.py down --workdir demo-work" in dry_run("down")
    # `make up SITES=N`: a centre and N sites (deploy/sites.py)
    assert "deploy/sites.py up --sites 2 --workdir sites-work" in dry_run("up", "SITES=2")
    assert "deploy/sites.py up" not in dry_run("up")
