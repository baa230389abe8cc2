"""Plain HTTP against a test hub's server (no proxy from the environment)."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from cellwatch.hub.service import HubService

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    text: str


def url_of(hub: HubService) -> str:
    assert hub.http is not None, "this hub serves no HTTP"
    return hub.http.url


def get(
    hub_or_url: HubService | str,
    path: str = "/",
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> Reply:
    base = hub_or_url if isinstance(hub_or_url, str) else url_of(hub_or_url)
    req = urllib.request.Request(base + path.lstrip("/"), headers=headers or {}, method=method)
    try:
        with _opener.open(req, timeout=30) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(hub: HubService | str) -> Samples:
    """/metrics of a hub (or the URL of a hub process) parsed with prometheus_client's
    parser: (sample name, sorted labels) -> value."""
    reply = get(hub, "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain"), reply.headers
    out: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not in /metrics: " + ", ".join(
        sorted({n for n, _ in samples if n.startswith(name)})
    )
    return samples[key]
