"""The node's bundle store on disk: a bundle counts only once completely in place,
what a crash leaves half-done is cleared when the store opens, a damaged bundle is
discarded, the revocation list survives a restart."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

from cellwatch.node.store import BundleStore
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.schemas import Revocation, RevocationList
from cellwatch.shared.signing import TrustedKeys
from tests.models import write_test_bundle
from tests.node.conftest import NodeFactory


def sha_of(bundle: Path, keys: Path) -> str:
    return load_bundle(bundle, TrustedKeys.load(keys)).manifest_sha256


def test_a_bundle_counts_once_complete_and_pruning_goes_through_the_trash(
    tmp_path: Path, toy_bundle: tuple[Path, Path]
) -> None:
    bundle, _ = toy_bundle
    store = BundleStore(tmp_path / "store", keep=2)
    for i in range(4):
        sha = f"{i:064x}"
        store.import_dir(sha, bundle)
        assert store.has(sha)
        store.set_active(sha)
    kept = sorted(p.name for p in store.bundles.iterdir())
    assert kept == [f"{i:064x}" for i in (2, 3)]
    assert sorted(p.name for p in store.markers.iterdir()) == kept
    assert list(store.trash.iterdir()) == []
    assert store.previous() == [f"{2:064x}"]


def test_what_a_crash_leaves_half_done_is_cleared_at_open(
    tmp_path: Path, toy_bundle: tuple[Path, Path]
) -> None:
    bundle, _ = toy_bundle
    store = BundleStore(tmp_path / "store")
    good, half, gone = f"{1:064x}", f"{2:064x}", f"{3:064x}"
    store.import_dir(good, bundle)
    store.set_active(good)
    # A crash after the rename into bundles/ and before the marker: not trusted.
    shutil.copytree(bundle, store.bundles / half)
    # A crash in the middle of a deletion: renamed into the trash, partly deleted.
    shutil.copytree(bundle, store.trash / f"{gone}.1234abcd")
    (store.trash / f"{gone}.1234abcd" / "model.bin").unlink()
    # A marker whose bundle is gone.
    (store.markers / gone).touch()
    again = BundleStore(tmp_path / "store")
    assert again.has(good) and not again.has(half) and not again.has(gone)
    assert sorted(p.name for p in again.bundles.iterdir()) == [good]
    assert list(again.trash.iterdir()) == [] and sorted(again.markers.iterdir()) == [
        again.markers / good
    ]
    assert again.active() == good


def test_a_store_written_before_the_markers_keeps_its_complete_bundles(
    tmp_path: Path, toy_bundle: tuple[Path, Path]
) -> None:
    bundle, keys = toy_bundle
    root = tmp_path / "store"
    sha = sha_of(bundle, keys)
    shutil.copytree(bundle, root / "bundles" / sha)
    broken = root / "bundles" / ("f" * 64)
    shutil.copytree(bundle, broken)
    (broken / "model.bin").write_bytes(b"short")  # a prune interrupted by a crash
    (root / "active").write_text(sha + "\n")
    (root / "history").write_text(f"{'f' * 64}\n{sha}\n")
    store = BundleStore(root)
    assert store.has(sha) and store.active() == sha
    assert not store.has("f" * 64) and not broken.exists()


def test_discard_forgets_a_bundle_and_its_history(
    tmp_path: Path, toy_bundle: tuple[Path, Path]
) -> None:
    bundle, _ = toy_bundle
    store = BundleStore(tmp_path / "store")
    a, b = f"{1:064x}", f"{2:064x}"
    for sha in (a, b):
        store.import_dir(sha, bundle)
        store.set_active(sha)
    store.discard(a)
    assert not store.has(a) and not store.path(a).exists() and store.history() == [b]
    store.import_dir(a, bundle)  # fetched again later
    assert store.has(a)


def test_the_revocation_list_survives_a_restart(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    assert store.revoked() is None
    now = datetime.now(UTC)
    revoked = RevocationList(
        revoked=[
            Revocation(
                name="toy", version="2.0.0", manifest_sha256="a" * 64, reason="x", revoked_at=now
            )
        ],
        issued_at=now,
    )
    store.save_revoked(revoked)
    assert BundleStore(tmp_path / "store").revoked() == revoked
    (tmp_path / "store" / "revoked.json").write_text("{not json")
    assert BundleStore(tmp_path / "store").revoked() is None  # unreadable: logged, ignored


def test_a_node_does_not_start_on_a_bundle_its_stored_list_revokes(
    tmp_path: Path, node_factory: NodeFactory, toy_bundle: tuple[Path, Path]
) -> None:
    """Before it connects (and hears the hub's list again), a restarting node already
    skips a revoked active bundle."""
    bundle, keys = toy_bundle
    v2 = write_test_bundle(tmp_path / "v2", keys, version="2.0.0", seed=5)
    store = BundleStore(tmp_path / "store")
    v1_sha, v2_sha = sha_of(bundle, keys), sha_of(v2, keys)
    for path, sha in ((bundle, v1_sha), (v2, v2_sha)):
        store.import_dir(sha, path)
        store.set_active(sha)
    now = datetime.now(UTC)
    store.save_revoked(
        RevocationList(
            revoked=[
                Revocation(
                    name="toy",
                    version="2.0.0",
                    manifest_sha256=v2_sha,
                    reason="bad batch",
                    revoked_at=now,
                )
            ],
            issued_at=now,
        )
    )
    node = node_factory(updates={"store_dir": tmp_path / "store"})
    assert node.model is not None and node.model.bundle.manifest_sha256 == v1_sha
    assert node.model_error is not None and node.model_error.code == "revoked"
    assert node.store is not None and node.store.active() == v1_sha
