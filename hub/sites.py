"""The sites the hub's fleet is spread over (DESIGN.md, Sites), as the hub knows them.

A site is a lab's own broker, bridged to the hub's central broker (deploy/site_conf.py).
Two things tell the hub about sites:

- each site's bridge writes its link's state on `{prefix}/sites/{site}/bridge`
  (Mosquitto's bridge notifications: `1`, retained, once connected; `0`, the bridge's
  Will, when the link drops), which only that site's bridge account may write;
- a node at a site names it in its status (`NodeStatus.site`).

While a site's link is down, its nodes are shown `unreachable` (not offline, stale or
failed: the hub cannot hear them, and they go on classifying), and the rollout engine
stops their timeout clocks (hub/rollout.py): a rollout that includes the site waits
for it. What it knows lives in memory only: the broker replays the retained link
states and node statuses to a hub that (re)starts.

Thread-safe: the control thread writes; the HTTP server and API read copies.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from cellwatch.shared.hubapi import SiteInfo

log = logging.getLogger(__name__)

LINK_UP, LINK_DOWN = b"1", b"0"
"""The payloads of Mosquitto's bridge notifications."""


@dataclass(frozen=True)
class Link:
    up: bool
    since: float


class Sites:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, Link] = {}
        self._site_of: dict[str, str] = {}

    def on_link(self, site: str, up: bool, now: float) -> bool:
        """A site's bridge said its link is up (or its Will said down); True when that
        is news."""
        with self._lock:
            before = self._links.get(site)
            if before is not None and before.up == up:
                return False
            self._links[site] = Link(up, now)
            nodes = sum(1 for s in self._site_of.values() if s == site)
        if up:
            log.info("site %s: link to the central broker up (%d nodes)", site, nodes)
        else:
            log.warning(
                "site %s: link to the central broker DOWN: its %d nodes are unreachable "
                "(not failed); rollouts wait for them",
                site,
                nodes,
            )
        return True

    def on_node(self, node_id: str, site: str | None) -> None:
        """The site a node's status names (None: on the central broker itself)."""
        with self._lock:
            if site is None:
                self._site_of.pop(node_id, None)
            else:
                self._site_of[node_id] = site

    def site_of(self, node_id: str) -> str | None:
        with self._lock:
            return self._site_of.get(node_id)

    def reachable(self, node_id: str) -> bool:
        """False while the link of the node's site is known to be down."""
        with self._lock:
            site = self._site_of.get(node_id)
            link = self._links.get(site) if site is not None else None
        return link is None or link.up

    def down(self) -> frozenset[str]:
        """The sites whose link is down."""
        with self._lock:
            return frozenset(s for s, link in self._links.items() if not link.up)

    def infos(self) -> list[SiteInfo]:
        """Every site the hub heard of (a bridge's link, or a node naming it), by name."""
        with self._lock:
            links = dict(self._links)
            counts: dict[str, int] = {}
            for site in self._site_of.values():
                counts[site] = counts.get(site, 0) + 1
        return [
            SiteInfo(
                site=site,
                link_up=links[site].up if site in links else None,
                since=datetime.fromtimestamp(links[site].since, UTC) if site in links else None,
                nodes=counts.get(site, 0),
            )
            for site in sorted(set(links) | set(counts))
        ]
