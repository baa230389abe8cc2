"""The node's update agent without the hub: store, activation, reports, the swap.

(Downloads from the hub are tested with the real hub in tests/hub.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cellwatch.node.service import NodeService
from cellwatch.node.store import BundleStore
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.schemas import DesiredModel, UpdateReport, utcnow
from cellwatch.shared.signing import TrustedKeys
from tests import images
from tests.broker import Broker
from tests.harness import Collector, Requester, T, wait_for
from tests.models import write_test_bundle
from tests.node.conftest import NodeFactory


@pytest.fixture(scope="module")
def second_bundle(toy_bundle: tuple[Path, Path]) -> Path:
    """Version 2.0.0 of the toy model, signed by the same trusted key."""
    _, keys = toy_bundle
    return write_test_bundle(keys.parent / "bundle-v2", keys, version="2.0.0", seed=5)


def desire(broker: Broker, node_id: str, bundle: Path, keys: Path, rollout: str = "r1") -> str:
    b = load_bundle(bundle, TrustedKeys.load(keys))
    d = DesiredModel(
        rollout_id=rollout,
        model={
            "name": b.manifest.name,
            "version": b.manifest.version,
            "manifest_sha256": b.manifest_sha256,
        },
        issued_at=utcnow(),
    )
    hub = broker.connect("hub")
    assert hub.publish_wait(T.desired(node_id), d.to_json(), qos=1, retain=True)
    return b.manifest_sha256


def stage(node: NodeService, bundle: Path, keys: Path) -> str:
    """Put bundle in the node's store as if it had been activated before; its sha."""
    assert node.store is not None
    sha = load_bundle(bundle, TrustedKeys.load(keys)).manifest_sha256
    node.store.import_dir(sha, bundle)
    return sha


def reports(watch: Collector, node_id: str = "node-1") -> list[UpdateReport]:
    return [UpdateReport.model_validate_json(m.payload) for m in watch.on(T.update(node_id))]


def test_store_keeps_the_last_versions(tmp_path: Path, toy_bundle: tuple[Path, Path]) -> None:
    store = BundleStore(tmp_path / "store", keep=3)
    for i in range(5):
        sha = f"{i:064x}"
        store.import_dir(sha, toy_bundle[0])
        store.set_active(sha)
    kept = sorted(p.name for p in (tmp_path / "store" / "bundles").iterdir())
    assert kept == [f"{i:064x}" for i in (2, 3, 4)]
    assert store.active() == f"{4:064x}" and store.history() == kept


def test_desired_in_store_activates_without_download_while_serving(
    tmp_path: Path,
    broker: Broker,
    node_factory: NodeFactory,
    requester: Requester,
    toy_bundle: tuple[Path, Path],
    second_bundle: Path,
) -> None:
    _, keys = toy_bundle
    watch = Collector(broker.settings("hub"), T.update("node-1"))
    node = node_factory(updates={"store_dir": tmp_path / "store"})
    assert node.store is not None and node.fetcher is not None
    v2_sha = stage(node, second_bundle, keys)
    corrs = [requester.send(images.jpeg()) for _ in range(20)]
    desire(broker, "node-1", second_bundle, keys)
    corrs += [requester.send(images.jpeg()) for _ in range(40)]
    versions = [requester.result(c).model for c in corrs]
    assert all(requester.result(c).status == "ok" for c in corrs)  # none failed in the swap
    names = [v.version for v in versions if v is not None]
    assert names[0] == "1.0.0" and names[-1] == "2.0.0"
    assert names == sorted(names)  # once switched, every later result is from 2.0.0
    wait_for(lambda: any(r.state == "active" for r in reports(watch)), what="active report")
    states = [r.state.value for r in reports(watch)]
    assert states == ["pending", "verifying", "activating", "active"]  # no downloading
    assert node.fetcher.bytes_received == 0
    assert node.store.active() == v2_sha
    watch.close()


def test_already_active_reports_active(
    tmp_path: Path, broker: Broker, node_factory: NodeFactory, toy_bundle: tuple[Path, Path]
) -> None:
    bundle, keys = toy_bundle
    watch = Collector(broker.settings("hub"), T.update("node-1"))
    node_factory(updates={"store_dir": tmp_path / "store"})
    desire(broker, "node-1", bundle, keys, rollout="same")
    wait_for(lambda: bool(reports(watch)), what="report")
    r = reports(watch)[0]
    assert (r.state, r.rollout_id, r.progress) == ("active", "same", 1.0)
    watch.close()


def test_restart_serves_the_last_activated_bundle(
    tmp_path: Path,
    broker: Broker,
    node_factory: NodeFactory,
    requester: Requester,
    toy_bundle: tuple[Path, Path],
    second_bundle: Path,
) -> None:
    _, keys = toy_bundle
    watch = Collector(broker.settings("hub"), T.update("node-1"))
    node = node_factory(updates={"store_dir": tmp_path / "store"})
    stage(node, second_bundle, keys)
    desire(broker, "node-1", second_bundle, keys)
    wait_for(lambda: any(r.state == "active" for r in reports(watch)), what="active")
    node.join()
    again: NodeService = node_factory(updates={"store_dir": tmp_path / "store"})
    assert again.model is not None and again.model.bundle.manifest.version == "2.0.0"
    r = requester.request(images.jpeg())
    assert r.model is not None and r.model.version == "2.0.0"
    watch.close()


def test_unreachable_hub_fails_with_fetch_failed_and_keeps_serving(
    tmp_path: Path,
    broker: Broker,
    node_factory: NodeFactory,
    requester: Requester,
    toy_bundle: tuple[Path, Path],
    second_bundle: Path,
) -> None:
    _, keys = toy_bundle
    watch = Collector(broker.settings("hub"), T.update("node-1"))
    updates = {"store_dir": tmp_path / "store", "chunk_timeout_s": 0.3, "stall_timeout_s": 1.0}
    node_factory(updates=updates)
    desire(broker, "node-1", second_bundle, keys)  # nobody serves the chunks
    wait_for(lambda: any(r.state == "failed" for r in reports(watch)), 60, "failed report")
    failed = next(r for r in reports(watch) if r.state == "failed")
    assert failed.error is not None and failed.error.code == "fetch_failed"
    r = requester.request(images.jpeg())
    assert r.status == "ok" and r.model is not None and r.model.version == "1.0.0"
    watch.close()


def test_self_test_failure_reports_failed_and_keeps_the_old_model(
    tmp_path: Path,
    broker: Broker,
    node_factory: NodeFactory,
    requester: Requester,
    toy_bundle: tuple[Path, Path],
) -> None:
    _, keys = toy_bundle
    broken = write_test_bundle(tmp_path / "broken", keys, version="3.0.0", golden_shift=0.5)
    watch = Collector(broker.settings("hub"), T.update("node-1"))
    node = node_factory(updates={"store_dir": tmp_path / "store"})
    stage(node, broken, keys)
    desire(broker, "node-1", broken, keys)
    wait_for(lambda: any(r.state == "failed" for r in reports(watch)), 60, "failed report")
    failed = next(r for r in reports(watch) if r.state == "failed")
    assert failed.error is not None and failed.error.code == "self_test_failed"
    r = requester.request(images.jpeg())
    assert r.status == "ok" and r.model is not None and r.model.version == "1.0.0"
    watch.close()
