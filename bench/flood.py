"""A node floods the hub with statuses: what it costs the hub (issue 17).

    python bench/flood.py [--count 20000]

Starts the project's Mosquitto (tests/broker.py) and a real `cellwatch-hub serve`
process, then, on node-1's credentials, publishes `--count` retained statuses (QoS 1),
each with a new boot_id (as a node that restarts in a loop, or an attacker with a
node's password, would), while an operator runs `cellwatch-hub nodes` once. Prints
the hub's CPU time from the first status until the last one is recorded, the
control queue's peak (/metrics), how long `cellwatch-hub nodes` took, the hub's log
lines meanwhile and its drop counters.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prometheus_client.parser import text_string_to_metric_families

from bench.common import cpu_name
from cellwatch.hub.client import HubClient
from cellwatch.shared.schemas import NodeStatus, utcnow
from cellwatch.shared.topics import Topics
from tests.broker import Broker, free_port

T = Topics()
BIN = Path(sys.executable).parent
HZ = 100  # os.sysconf("SC_CLK_TCK") on Linux
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime


def metrics(port: int) -> dict[str, float]:
    with _opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="statuses")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cw-flood-") as tmp:
        work = Path(tmp)
        broker = Broker.create(work / "broker", nodes=["node-1"])
        hub_log = work / "hub.log"
        http = free_port()
        secret = work / "hub.password"
        secret.write_text(broker.password("hub"))
        cfg = work / "hub.toml"
        cfg.write_text(
            f'data_dir = "{work / "hub"}"\n[http]\nlisten = "127.0.0.1:{http}"\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nusername = "hub"\n'
            f'password_file = "{secret}"\n'
        )
        with hub_log.open("wb") as out:
            hub = subprocess.Popen(
                [str(BIN / "cellwatch-hub"), "serve", "--config", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        operator = HubClient(broker.settings("operator"), timeout_s=60)
        try:
            deadline = time.monotonic() + 120
            while "hub: serving" not in hub_log.read_text():
                if hub.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the hub did not start:\n{hub_log.read_text()}")
                time.sleep(0.1)
            operator.connect()
            node = broker.connect("node-1")
            op_secret = work / "operator.password"
            op_secret.write_text(broker.password("operator"))
            nodes_cli = [
                str(BIN / "cellwatch-hub"),
                "nodes",
                "--port",
                str(broker.port),
                "--password-file",
                str(op_secret),
            ]
            print(f"{cpu_name()}; {args.count} statuses, each with a new boot_id")
            lines_before = len(hub_log.read_text().splitlines())
            cpu_before = cpu_s(hub.pid)
            since = utcnow()
            cli_s: list[float] = []
            cli_rc: list[int] = []

            def run_cli() -> None:
                t0 = time.monotonic()
                r = subprocess.run(nodes_cli, capture_output=True, text=True, check=False)
                cli_s.append(time.monotonic() - t0)
                cli_rc.append(r.returncode)

            cli = threading.Thread(target=run_cli)
            started = time.monotonic()
            for i in range(args.count):
                status = NodeStatus(
                    node_id="node-1",
                    state="online",
                    boot_id=uuid.uuid4().hex,
                    since=since,
                    tags=[f"n{i}"],
                )
                node.publish(T.status("node-1"), status.to_json(), qos=1, retain=True)
                if i == args.count // 10:
                    cli.start()
            assert node.publish_wait(T.telemetry("node-1"), b"", qos=1, timeout=600)
            sent_s = time.monotonic() - started
            last = f"n{args.count - 1}"
            while True:
                known = {n.node_id: n for n in operator.nodes().nodes}
                if "node-1" in known and known["node-1"].tags == [last]:
                    break
                time.sleep(0.2)
            done_s = time.monotonic() - started
            cpu = cpu_s(hub.pid) - cpu_before
            cli.join()
            m = metrics(http)
            lines = len(hub_log.read_text().splitlines()) - lines_before
            print(f"sent in {sent_s:.1f} s; last status recorded after {done_s:.1f} s")
            print(f"hub CPU {cpu:.1f} s")
            print(f"control queue peak {m['cellwatch_hub_control_queue_peak']:.0f}")
            print(f"cellwatch-hub nodes took {cli_s[0]:.1f} s (exit {cli_rc[0]})")
            print(f"hub log lines during the flood: {lines}")
            dropped = {
                k.split("reason=")[1]: v
                for k, v in m.items()
                if k.startswith("cellwatch_hub_messages_dropped_total") and v
            }
            print(f"dropped by reason: {dropped}")
        finally:
            operator.close()
            hub.terminate()
            hub.wait(60)
            broker.close_clients()
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
