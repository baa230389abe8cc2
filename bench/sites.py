"""Bytes over a site's bridge for one bundle to N nodes at the site: without a relay and
with one (not a test).

    python bench/sites.py [--nodes 1,5,10] [--size-mb 10]

Sets up the sites of tests/sites/topology.py on this machine (the central broker with a
real hub process; two site brokers whose bridges, written by deploy/site_conf.py, reach
the centre through a counting Link, deploy/sitelink.py): site `plain` without a relay,
site `relay` with one (`cellwatch-hub relay`). Pushes a synthetic signed bundle of
--size-mb to the hub, then for each N of --nodes, N SIMULATED nodes at each site fetch
the whole bundle with the node's own Fetcher (every chunk and file hash checked, as in
a rollout's download), one after another, and the bench prints the bytes that came in
over each site's link since the push, in MB and in bundles: without a relay N x the
bundle, with one the relay's single fetch from the hub however many nodes ask.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_name
from bench.hubproc import MB
from bench.rollout import synthetic_bundle
from cellwatch.hub.client import HubClient
from cellwatch.shared.manifest import MANIFEST_FILE
from tests.sites.topology import World, central_broker, fetch_bundle, make_site, wait_hub

PLAIN, RELAY = "plain", "relay"


def run(counts: list[int], size_mb: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="cellwatch-bench-sites-"))
    keys = work / "keys"
    keys.mkdir()
    bundle = synthetic_bundle(work / "bundle", keys, size_mb, "2.0.0")
    size = sum(p.stat().st_size for p in bundle.iterdir())
    n = max(counts)
    ids = {s: [f"{s}-node-{i}" for i in range(1, n + 1)] for s in (PLAIN, RELAY)}
    central = central_broker(work / "central", {PLAIN: ids[PLAIN], RELAY: [*ids[RELAY], "relay-1"]})
    world = World(work / "run", central, {}, bundle, keys)
    world.work.mkdir()
    try:
        world.sites[PLAIN] = make_site(work / PLAIN, central, PLAIN, ids[PLAIN])
        world.sites[RELAY] = make_site(work / RELAY, central, RELAY, ids[RELAY], ["relay-1"])
        world.hub().start()
        world.relay(RELAY, "relay-1").start()
        wait_hub(central)
        with HubClient(central.settings("operator"), timeout_s=120) as op:
            op.push(bundle)
        sha = hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()
        print(
            f"bundle {size / MB:.1f} MB; on {cpu_name()}, 2 cores, shared with other work",
            flush=True,
        )
        start = {s: world.sites[s].link.counts().from_central for s in (PLAIN, RELAY)}
        print()
        print("| nodes at the site fetched the bundle | without a relay | with a relay |")
        print("|---|---|---|")
        done = 0
        for count in counts:
            for s in (PLAIN, RELAY):
                for node_id in ids[s][done:count]:
                    fetch_bundle(world.sites[s].broker, node_id, sha, work / "sim" / node_id)
                    shutil.rmtree(work / "sim" / node_id)
            done = count
            cells = []
            for s in (PLAIN, RELAY):
                crossed = world.sites[s].link.counts().from_central - start[s]
                cells.append(f"{crossed / MB:.1f} MB = {crossed / size:.2f} x bundle")
            print(f"| {count} | {cells[0]} | {cells[1]} |", flush=True)
    finally:
        world.stop()
        for site in world.sites.values():
            site.stop()
        central.close_clients()
        central.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", default="1,5,10", help="fleet sizes at each site")
    parser.add_argument("--size-mb", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cellwatch.shared.mqtt").setLevel(logging.ERROR)
    run(sorted({int(c) for c in args.nodes.split(",")}), args.size_mb)


if __name__ == "__main__":
    main()
