"""`cellwatch-hub serve` in a process of its own for the benchmarks, so that its memory
and CPU are its own: start it on a broker, wait until it answers, sample it, read its
/metrics, stop it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import HubUnavailable
from tests.broker import Broker, free_port

BIN = Path(sys.executable).parent
MB = 1e6
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HubProcess:
    """A hub on `broker` with its data in work/hub (HTTP on a free port with http=True)."""

    def __init__(
        self, work: Path, broker: Broker, keys: Path, *, http: bool = False, extra: str = ""
    ) -> None:
        self.config = work / "hub.toml"
        self.data = work / "hub"
        self.http_port = free_port() if http else None
        web = (
            f'[http]\nlisten = "127.0.0.1:{self.http_port}"\n'
            if http
            else "[http]\nenabled = false\n"
        )
        self.config.write_text(
            f'data_dir = "{self.data}"\ntrusted_keys = "{keys}"\nlog_level = "WARNING"\n{extra}'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            f'password_file = "{broker.dir / "secrets" / "hub.password"}"\n' + web
        )
        self.log = (work / "hub.log").open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "cellwatch-hub"), "serve", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, broker: Broker) -> None:
        probe = HubClient(broker.settings("operator"), timeout_s=1.0)
        probe.connect()
        try:
            deadline = time.monotonic() + 60
            while True:  # a request sent before the hub subscribed is never answered
                try:
                    probe.stats()
                    break
                except HubUnavailable:
                    assert self.proc.poll() is None, f"the hub exited: see {self.log.name}"
                    assert time.monotonic() < deadline, "the hub did not start"
        finally:
            probe.close()

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        return float(self.ps.memory_info().rss) / MB

    def get(self, path: str, timeout: float = 120) -> tuple[float, bytes]:
        """(seconds, body) of GET path on the hub's HTTP server."""
        assert self.http_port is not None, "the hub was started without HTTP"
        t0 = time.perf_counter()
        with _opener.open(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as r:
            body: bytes = r.read()
        return time.perf_counter() - t0, body

    def metrics(self) -> dict[str, float]:
        """/metrics as {name,label=value...: value} (the hub's own samples)."""
        _, body = self.get("/metrics")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if not s.name.startswith("cellwatch_hub") and not s.name.startswith("process"):
                    continue
                key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
                out[key] = s.value
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log.close()
