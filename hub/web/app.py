"""The Starlette application: pages, `/api/...`, `/metrics`, static files, and the
guard in front of them (Host check, bearer token, security headers). GET only.

Pages are rendered on the server (Jinja2, autoescape on: node ids, tags, model
names and error messages come from the network). `?fragment=1` renders only a
page's live part: the page's script fetches it every second and swaps it in.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cellwatch.hub.config import HttpSettings, is_loopback
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.queries import as_json
from cellwatch.hub.web import filters, modelviews, nodeviews, rolloutviews
from cellwatch.hub.web.metrics import make_registry
from cellwatch.hub.web.reader import FleetReader
from cellwatch.shared import states
from cellwatch.shared.base import first_problem
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.hubapi import ModelsArgs
from cellwatch.shared.limits import DEFAULT_TELEMETRY_INTERVAL_S, STALE_AFTER_INTERVALS
from cellwatch.shared.schemas import ApiError
from cellwatch.shared.states import NodeState

log = logging.getLogger(__name__)

REFRESH_MS = 1000
"""How often an open page fetches its live part (the issue asks for < 2 s)."""
RECENT_ROLLOUTS = 5
"""Finished rollouts the fleet page shows beside the active ones."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("cellwatch.hub.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        num=filters.num,
        ago=filters.ago,
        clock=filters.clock,
        size=filters.size,
        short=filters.short,
    )
    env.filters["path"] = lambda value: quote(str(value), safe="")
    env.filters["tone"] = states.tone
    env.filters["label"] = states.label
    env.globals["rolling_back"] = states.rolling_back
    return env


class Pages:
    """The route handlers (sync: Starlette runs them in its thread pool)."""

    def __init__(self, reader: FleetReader) -> None:
        self.reader = reader
        self.env = _environment()
        self.registry = make_registry(reader)

    # -- helpers -------------------------------------------------------------------------
    def _page(self, request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        now = time.time()
        ctx.update(
            now=now,
            refresh_ms=REFRESH_MS,
            stale_after=STALE_AFTER_INTERVALS,
            default_interval=DEFAULT_TELEMETRY_INTERVAL_S,
        )
        template = self.env.get_template(name)
        if request.query_params.get("fragment") == "1":
            body = "".join(template.blocks["live"](template.new_context(ctx)))
        else:
            body = template.render(ctx)
        return HTMLResponse(body, status_code=status)

    def _not_found(self, request: Request, what: str) -> Response:
        return self._page(request, "missing.html", status=404, what=what)

    # -- pages ---------------------------------------------------------------------------
    def fleet(self, request: Request) -> Response:
        now = time.time()
        q = self.reader.queries
        reply = q.nodes(now)
        nodes = reply.nodes
        active, recent = q.active_and_recent(RECENT_ROLLOUTS)
        rows = nodeviews.node_rows(nodes, self.reader.history.all_samples(now), now)
        online = [r for r in rows if r.state == NodeState.ONLINE]
        src = self.reader.sources
        return self._page(
            request,
            "fleet.html",
            nodes=rows,
            sites=reply.sites,
            counts=nodeviews.state_counts(nodes),
            fleet_ips=sum(float(r.telemetry.get("throughput_ips") or 0.0) for r in online),
            models=modelviews.model_rows(q.models().models, nodes),
            active=[rolloutviews.rollout_row(r) for r in active],
            recent=[rolloutviews.rollout_row(r) for r in recent],
            queue_depth=src.control_depth(),
            queue_peak=src.control_peak(),
            dropped=sum(src.counters.dropped_by_reason().values()),
            dropped_by_reason=src.counters.dropped_by_reason(),
            sample_counts=self.reader.db.sample_counts(),
        )

    def node(self, request: Request) -> Response:
        node_id = request.path_params["node_id"]
        now = time.time()
        info = next((n for n in self.reader.queries.nodes(now).nodes if n.node_id == node_id), None)
        if info is None:
            return self._not_found(request, f"node {node_id}")
        samples = self.reader.history.samples(node_id, now)
        row = nodeviews.node_rows([info], {node_id: samples}, now)[0]
        return self._page(
            request,
            "node.html",
            node=row,
            series=nodeviews.node_series(samples, now),
            targets=nodeviews.node_targets(self.reader.db.targets_of(node_id)),
        )

    def rollout(self, request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        try:
            info = self.reader.queries.rollout(rollout_id)
        except ApiFailure:
            return self._not_found(request, f"rollout {rollout_id}")
        return self._page(
            request,
            "rollout.html",
            rollout=rolloutviews.rollout_row(info),
            events=rolloutviews.event_rows(self.reader.db.rollout_events(info.rollout_id)),
        )

    # -- machines ------------------------------------------------------------------------
    def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @staticmethod
    def _json(data: BaseModel) -> Response:
        return Response(as_json(data) + "\n", media_type="application/json")

    @staticmethod
    def _api_error(code: ApiErrorCode, message: str, status: int) -> Response:
        body = as_json(ApiError(code=code, message=message)) + "\n"
        return Response(body, status_code=status, media_type="application/json")

    def api_nodes(self, request: Request) -> Response:
        return self._json(self.reader.queries.nodes(time.time()))

    def api_models(self, request: Request) -> Response:
        try:
            args = ModelsArgs.model_validate({"name": request.query_params.get("name")})
        except ValidationError as exc:
            return self._api_error(ApiErrorCode.BAD_REQUEST, first_problem(exc), 400)
        return self._json(self.reader.queries.models(args.name))

    def api_stats(self, request: Request) -> Response:
        return self._json(self.reader.queries.stats())

    def api_rollouts(self, request: Request) -> Response:
        return self._json(self.reader.queries.rollouts())

    def api_rollout(self, request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        try:
            info = self.reader.queries.rollout(None if rollout_id == "latest" else rollout_id)
        except ApiFailure as exc:
            return self._api_error(exc.code, exc.message, 404)
        return self._json(info)


class Guard:
    """In front of every request: the Host check (loopback names only when listening
    on loopback: a web page elsewhere cannot reach this one through DNS rebinding),
    the bearer token when one is configured, security headers on every answer."""

    def __init__(self, app: ASGIApp, settings: HttpSettings, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.hosts = {h.lower() for h in settings.allowed_hosts}
        self.loopback_only = not self.hosts and is_loopback(settings.host)

    def _host_ok(self, header: str) -> bool:
        host = header.strip().lower()
        if host.startswith("["):
            host = host[1 : host.find("]")] if "]" in host else ""
        elif host.count(":") == 1:
            host = host.split(":")[0]
        if self.hosts:
            return host in self.hosts
        return is_loopback(host) if self.loopback_only else True

    def _token_ok(self, header: str) -> bool:
        assert self.token is not None
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        if not self._host_ok(headers.get("host", "")):
            response: Response = PlainTextResponse("unexpected Host header\n", status_code=400)
            await response(scope, receive, secured)
            return
        if self.token is not None and not self._token_ok(headers.get("authorization", "")):
            response = PlainTextResponse(
                "this hub needs Authorization: Bearer TOKEN\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="cellwatch-hub"'},
            )
            await response(scope, receive, secured)
            return
        await self.app(scope, receive, secured)


def build_app(reader: FleetReader, settings: HttpSettings, token: str | None) -> ASGIApp:
    pages = Pages(reader)
    app = Starlette(
        routes=[
            Route("/", pages.fleet),
            Route("/nodes/{node_id:path}", pages.node),
            Route("/rollouts/{rollout_id}", pages.rollout),
            Route("/metrics", pages.metrics),
            Route("/api/nodes", pages.api_nodes),
            Route("/api/models", pages.api_models),
            Route("/api/stats", pages.api_stats),
            Route("/api/rollouts", pages.api_rollouts),
            Route("/api/rollouts/{rollout_id}", pages.api_rollout),
            Mount("/static", StaticFiles(packages=[("cellwatch.hub.web", "static")])),
        ]
    )
    return Guard(app, settings, token)
