"""A site relay (`cellwatch-hub relay`): answers its site's bundle fetch requests from a
local cache, and fetches each bundle from the hub once (DESIGN.md, Sites).

At a site (a lab's own broker, bridged to the hub's central broker: deploy/site_conf.py
with --relay), the nodes ask for bundle chunks as they always do, on
`{prefix}/hub/fetch/{node_id}`; the bridge leaves those at the site, and the relay
answers them (the site's relays share them: `$share/cellwatch-relays/...`, each request
to one relay). It answers a file only from its cache (hub/relaycache.py), where a file
enters after its check: the manifest's SHA-256 is the bundle's address, the signature
verifies with a trusted key, every other file has the manifest's size and hash.

A request for a file the cache does not hold yet is held (for `hold_s`) while the relay
fetches the bundle from the hub: with the node's own fetch code (node/fetcher.py: the
one chunk transfer, resumed from `{file}.part` after a restart), on
`{prefix}/hub/fetch/{relay_id}` with replies on `{prefix}/nodes/{relay_id}/fetch`
(the topics the bridge forwards for it), one bundle at a time. Held requests are
answered as soon as their file is in; those still waiting after hold_s are answered
`not_ready`, and the node asks again (shared/rpc/transfer.py), so a bundle that takes
long to cross a slow or broken link fails no node. A fetch from the hub that fails (the
link is down) is tried again `fetch.retry_s` later while nodes still ask for it; one
the hub refuses (revoked, unknown) is answered with the hub's error.

Faults: a file changed on disk is checked again before it is served, and fetched again
if it fails (the relay heals its cache); nodes check every hash and the signature
themselves, so whoever can write the relay's disk cannot make a node run a bundle the
release key did not sign. A full cache makes room by removing the bundles used least
recently; a bundle that still does not fit, or a full disk (ENOSPC), is answered
`unavailable` with the reason (the node reports `fetch_failed` with it). The hub's
signed revocations (`{prefix}/hub/revoked`, as the nodes read them; the relay's copy:
hub/relayrevocations.py) remove a revoked bundle from the cache, and its files are
answered `revoked`.

Threads: paho's network thread only checks and queues; `fetch-N` workers answer
requests; the `cache` thread fetches bundles; the `tick` thread answers held requests
that waited hold_s, starts retries and applies revocation lists.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from cellwatch.hub.config import RelaySettings
from cellwatch.hub.fetch import (
    FETCH_QUEUE,
    MAX_FETCH_REQUEST_BYTES,
    fetch_replies,
    send_chunk,
    send_error,
)
from cellwatch.hub.relaycache import CacheFull, RelayCache, is_disk_full
from cellwatch.hub.relayrevocations import RelayRevocations
from cellwatch.node.fetcher import FetchCancelled, Fetcher, FetchError
from cellwatch.shared.bundle import check_file_name
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.daemon import Daemon
from cellwatch.shared.errors import BundleError, ConfigError, SignatureError, TopicError
from cellwatch.shared.handoff import Handoff
from cellwatch.shared.limits import MAX_MANIFEST_BYTES, MAX_REVOCATION_BYTES
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.rpc import Edge, Inbound, Problem, Rejected, Route
from cellwatch.shared.schemas import FetchRequest, RevocationList
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

RELAY_PROPERTY = "relay"
"""User property on a relay's own fetch requests (its id): another relay of the site
leaves them to the hub."""
TICK_S = 0.25
BUSY_S = 60.0
"""A bundle a node asked for within this long is not removed to make room."""
DEFINITIVE = frozenset(
    {
        ApiErrorCode.REVOKED,
        ApiErrorCode.UNKNOWN_BUNDLE,
        ApiErrorCode.UNKNOWN_FILE,
        ApiErrorCode.BAD_REQUEST,
        ApiErrorCode.BAD_OFFSET,
    }
)
"""The hub's answers that asking again will not change: passed on to the nodes."""

Held = dict[tuple[str, int], tuple[Inbound[FetchRequest], float]]
"""(node id, offset) -> the request and when it came (monotonic)."""


class Relay(Daemon):
    """One site relay. `start()`, then `stop()` (e.g. from a signal) and `join()`."""

    def __init__(self, settings: RelaySettings) -> None:
        super().__init__("relay")
        self.settings = settings
        self.relay_id = settings.relay_id
        self.topics = t = Topics(settings.mqtt.topic_prefix)
        self.trusted = TrustedKeys.load(settings.trusted_keys)
        if not self.trusted.keys and not settings.allow_unsigned:
            raise ConfigError(
                "relay: trusted_keys names no *.pub key: the relay checks each bundle's "
                "signature before it serves it (set trusted_keys to the nodes' directory)"
            )
        self.cache = RelayCache(
            settings.cache_dir,
            settings.max_cache_bytes,
            self.trusted,
            allow_unsigned=settings.allow_unsigned,
        )
        self.mqtt = MqttClient(settings.mqtt, client_id=settings.client_id, clean_start=True)
        f = settings.fetch
        self.fetcher = Fetcher(
            self.mqtt,
            t,
            self.relay_id,
            window=f.window,
            chunk_bytes=f.chunk_bytes,
            timeout_s=f.timeout_s,
            stall_timeout_s=f.stall_timeout_s,
            user=((RELAY_PROPERTY, self.relay_id),),
        )
        self.requests: Handoff[Inbound[FetchRequest]] = Handoff(FETCH_QUEUE, name="relay: requests")
        self.jobs: Handoff[str] = Handoff(name="relay: bundles")
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], Held] = {}
        """(bundle, file) -> the requests waiting for it."""
        self._jobs: set[str] = set()
        """Bundles queued for the cache thread or being fetched."""
        self._retry_at: dict[str, float] = {}
        self._asked: dict[str, float] = {}
        """Bundle -> when a node last asked for one of its files (monotonic)."""
        self._lists: queue.SimpleQueue[RevocationList] = queue.SimpleQueue()
        self.revocations = RelayRevocations(
            settings.cache_dir,
            self.trusted,
            self.relay_id,
            allow_unsigned=settings.allow_unsigned,
        )
        self.served_bytes = 0
        self.edge = Edge(self.mqtt)
        for route in self.routes():
            self.edge.add(route)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the site's broker (MqttError if it refuses) and serve."""
        for i in range(self.settings.workers):
            self._spawn(self._serve_loop, f"fetch-{i}")
        self._spawn(self._cache_loop, "cache")
        self._spawn(self._tick_loop, "tick")
        self.mqtt.connect()
        log.info(
            "relay %s: serving its site's fetch requests from %s (%d bytes cached)",
            self.relay_id,
            self.settings.cache_dir,
            self.cache.usage(),
        )

    def join(self) -> None:
        self._stop.set()
        self.requests.close()
        self.jobs.close()
        self.mqtt.disconnect()
        self.fetcher.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        log.info(
            "relay %s: stopped (%d bytes served to the site, %d fetched from the hub)",
            self.relay_id,
            self.served_bytes,
            self.fetcher.bytes_received,
        )

    # -- network thread ----------------------------------------------------------------
    def routes(self) -> list[Route[Any]]:
        t = self.topics
        requests: Route[FetchRequest] = Route(
            t.hub_fetch_filter(),
            FetchRequest.model_validate_json,
            self._take,
            max_bytes=MAX_FETCH_REQUEST_BYTES,
            reply=fetch_replies(t),
            on_rejected=self._refuse,
            subscription=t.hub_fetch_relay_subscription(),
            name="fetch request",
        )
        revoked: Route[RevocationList] = Route(
            t.hub_revoked(),
            RevocationList.model_validate_json,
            lambda inbound: self._lists.put(inbound.body),
            max_bytes=MAX_REVOCATION_BYTES,
            empty_clears=True,
            name="revocation list",
        )
        return [requests, self.fetcher.route(), revoked]

    def _take(self, inbound: Inbound[FetchRequest]) -> None:
        """Queue a node's request for the workers (a relay's own are left to the hub)."""
        try:
            asker = self.topics.fetch_node_of(inbound.topic)
        except TopicError:
            return
        if asker == self.relay_id or RELAY_PROPERTY in inbound.message.user:
            return
        if not self.requests.offer(inbound):
            log.warning("relay %s: request queue full: a request dropped (asked again)", asker)

    def _refuse(self, rejected: Rejected) -> None:
        what = "invalid FetchRequest" if rejected.problem is Problem.MALFORMED else "request"
        if rejected.reply_to.topic is not None:
            send_error(rejected, ApiErrorCode.BAD_REQUEST, f"{what}: {rejected.reason}")

    # -- workers ------------------------------------------------------------------------
    def _serve_loop(self) -> None:
        while (inbound := self.requests.get()) is not None:
            try:
                self._serve(inbound)
            except Exception:  # keep serving whatever one request did
                log.exception("relay: request on %s failed", inbound.topic)

    def _serve(self, inbound: Inbound[FetchRequest]) -> None:
        if inbound.reply_to.topic is None:
            log.warning(
                "relay: a request on %s asked for replies on %r, not its node's own fetch "
                "topic: dropped",
                inbound.topic,
                inbound.reply_to.refused,
            )
            return
        req = inbound.body
        sha, name = req.manifest_sha256, req.file
        if sha in self.revocations.shas:
            send_error(inbound, ApiErrorCode.REVOKED, f"bundle {sha[:12]} was revoked")
            return
        with self._lock:
            self._asked[sha] = time.monotonic()
        path = self.cache.ready(sha, name)
        if path is not None:
            self._send(inbound, path)
            return
        try:
            check_file_name(name)
        except BundleError as exc:
            send_error(inbound, ApiErrorCode.UNKNOWN_FILE, str(exc))
            return
        manifest = self.cache.manifest(sha)
        if manifest is not None and name not in (MANIFEST_FILE, SIGNATURE_FILE, *manifest.files):
            send_error(inbound, ApiErrorCode.UNKNOWN_FILE, f"bundle {sha[:12]} has no file {name}")
            return
        node = self.topics.fetch_node_of(inbound.topic)
        with self._lock:
            self._held.setdefault((sha, name), {})[(node, req.offset)] = (
                inbound,
                time.monotonic(),
            )
        self._want(sha)
        # The file may have come in between the look and the hold: serve it then.
        path = self.cache.ready(sha, name)
        if path is not None:
            self._release(sha, name, path)

    def _send(self, inbound: Inbound[FetchRequest], path: Path) -> None:
        sent = send_chunk(inbound, path, self.settings.max_chunk_bytes)
        if sent is not None:
            with self._lock:
                self.served_bytes += sent

    def _release(self, sha: str, name: str, path: Path) -> None:
        """Answer every request held for file `name` of sha (it is in the cache now)."""
        with self._lock:
            held = self._held.pop((sha, name), {})
        for inbound, _ in held.values():
            self._send(inbound, path)

    def _fail(self, sha: str, code: ApiErrorCode, message: str) -> None:
        """Answer every request held for bundle sha with an error."""
        with self._lock:
            keys = [k for k in self._held if k[0] == sha]
            held = [r for k in keys for r in self._held.pop(k).values()]
        log.error(
            "relay %s: bundle %s: %s (%d requests answered %s)",
            self.relay_id,
            sha[:12],
            message,
            len(held),
            code,
        )
        for inbound, _ in held:
            send_error(inbound, code, message)

    def _want(self, sha: str) -> None:
        """Have the cache thread fetch bundle sha, unless it does or must wait to retry."""
        with self._lock:
            if sha in self._jobs or self._retry_at.get(sha, 0.0) > time.monotonic():
                return
            self._retry_at.pop(sha, None)
            self._jobs.add(sha)
        self.jobs.put(sha)

    def _busy(self) -> frozenset[str]:
        """Bundles a node asked for lately, or being fetched: not removed to make room."""
        now = time.monotonic()
        with self._lock:
            return frozenset(s for s, t in self._asked.items() if now - t < BUSY_S) | frozenset(
                self._jobs
            )

    # -- the cache thread ---------------------------------------------------------------
    def _cache_loop(self) -> None:
        while (sha := self.jobs.get()) is not None:
            try:
                self._cache(sha)
            except FetchCancelled:
                return  # stopping
            except Exception:  # the relay outlives anything one bundle does
                log.exception("relay %s: caching %s failed", self.relay_id, sha[:12])
                self._retry_later(sha)
            finally:
                with self._lock:
                    self._jobs.discard(sha)

    def _cache(self, sha: str) -> None:
        started, before = time.monotonic(), self.fetcher.bytes_received
        try:
            self._fetch_file(sha, MANIFEST_FILE, None, MAX_MANIFEST_BYTES)
            self._fetch_file(sha, SIGNATURE_FILE, None, MAX_MANIFEST_BYTES)
            manifest = self.cache.manifest(sha)
            if manifest is None:  # removed since (changed on disk): fetch it again
                self._retry_later(sha, at_once=True)
                return
            total = sum(e.size for e in manifest.files.values())
            self.cache.reserve(sha, total, keep=self._busy())
            for name, entry in manifest.files.items():
                self._fetch_file(sha, name, entry.size, None)
        except FetchError as exc:
            if exc.code is not None and exc.code in DEFINITIVE:
                self.cache.discard_incoming(sha)
                self._fail(sha, ApiErrorCode(exc.code), f"the hub answered: {exc}")
            else:
                log.warning(
                    "relay %s: fetching %s from the hub failed (%s): trying again in %g s "
                    "while nodes ask for it",
                    self.relay_id,
                    sha[:12],
                    exc,
                    self.settings.fetch.retry_s,
                )
                self._retry_later(sha)
            return
        except CacheFull as exc:
            self._full(sha, exc)
            return
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._full(sha, exc)
            return
        except SignatureError as exc:
            self.cache.discard(sha)
            self._fail(sha, ApiErrorCode.UNAVAILABLE, f"relay {self.relay_id}: {exc}")
            return
        except BundleError as exc:
            log.warning(
                "relay %s: %s from the hub failed its check (%s): fetching it again",
                self.relay_id,
                sha[:12],
                exc,
            )
            self._retry_later(sha, at_once=True)
            return
        fetched = self.fetcher.bytes_received - before
        if fetched:
            log.info(
                "relay %s: bundle %s cached: %d bytes from the hub in %.1f s",
                self.relay_id,
                sha[:12],
                fetched,
                time.monotonic() - started,
            )

    def _fetch_file(self, sha: str, name: str, size: int | None, max_size: int | None) -> None:
        if self.cache.ready(sha, name) is not None:
            return
        dest = self.cache.incoming(sha, name)
        self.fetcher.fetch(
            sha, name, dest, expected_size=size, max_size=max_size, cancelled=self._stop.is_set
        )
        self._release(sha, name, self.cache.admit(sha, name))

    def _full(self, sha: str, exc: Exception) -> None:
        """No room for bundle sha: remove an unused bundle and try again, or give up."""
        if isinstance(exc, OSError) and self.cache.evict(self._busy() | {sha}) is not None:
            self._retry_later(sha, at_once=True)
            return
        self.cache.discard_incoming(sha)
        self._fail(
            sha,
            ApiErrorCode.UNAVAILABLE,
            f"relay {self.relay_id} cannot cache bundle {sha[:12]}: {exc}",
        )

    def _retry_later(self, sha: str, *, at_once: bool = False) -> None:
        with self._lock:
            self._retry_at[sha] = time.monotonic() + (
                0.0 if at_once else self.settings.fetch.retry_s
            )

    # -- the tick thread ----------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self._tick()
            except Exception:
                log.exception("relay %s: tick failed", self.relay_id)

    def _tick(self) -> None:
        now = time.monotonic()
        hold = self.settings.hold_s
        expired: list[tuple[str, str, Inbound[FetchRequest]]] = []
        due: list[str] = []
        with self._lock:
            for (sha, name), held in self._held.items():
                for key in [k for k, (_, t) in held.items() if now - t >= hold]:
                    expired.append((sha, name, held.pop(key)[0]))
            self._held = {k: v for k, v in self._held.items() if v}
            for sha, at in list(self._retry_at.items()):
                asked = self._asked.get(sha, 0.0)
                if at <= now and now - asked < self.settings.fetch.retry_s + 2 * hold:
                    due.append(sha)
        for sha, name, inbound in expired:
            send_error(
                inbound,
                ApiErrorCode.NOT_READY,
                f"relay {self.relay_id} is fetching {name} of {sha[:12]} from the hub",
            )
        for sha in due:
            with self._lock:
                self._retry_at[sha] = 0.0
            self._want(sha)
        while True:
            try:
                incoming = self._lists.get_nowait()
            except queue.Empty:
                break
            self._apply_revocations(incoming)

    # -- revocations --------------------------------------------------------------------
    def _apply_revocations(self, incoming: RevocationList) -> None:
        for sha in self.revocations.merge(incoming):
            self.cache.discard(sha)
            self._fail(sha, ApiErrorCode.REVOKED, f"bundle {sha[:12]} was revoked")
