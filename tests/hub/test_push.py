"""Push: the registry protocol over the real broker, through HubClient and the CLI."""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.service import HubService
from cellwatch.shared.bundle import pack_tar
from cellwatch.shared.hubapi import (
    PushBeginArgs,
    PushBeginReply,
    PushCommitArgs,
    RolloutStartArgs,
)
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.schemas import ModelRef
from tests.harness import wait_for
from tests.hub.conftest import Bundles, NodeMaker


def test_push_stores_the_bundle_and_twice_is_a_no_op(
    hub: HubService, operator: HubClient, bundles: Bundles
) -> None:
    seen: list[tuple[int, int]] = []
    first = operator.push(bundles.v1, lambda done, total: seen.append((done, total)))
    sha = bundles.sha(bundles.v1)
    assert first.status == "stored" and first.model["manifest_sha256"] == sha
    assert first.model["signer"] is not None
    payload = sum(p.stat().st_size for p in bundles.v1.iterdir()) - (
        (bundles.v1 / MANIFEST_FILE).stat().st_size + (bundles.v1 / SIGNATURE_FILE).stat().st_size
    )
    assert first.bytes_sent == payload and seen[-1] == (payload, payload)
    stored = hub.store.path(sha)
    assert sorted(p.name for p in stored.iterdir()) == sorted(p.name for p in bundles.v1.iterdir())
    for p in bundles.v1.iterdir():
        assert (stored / p.name).read_bytes() == p.read_bytes()
    again = operator.push(bundles.v1)
    assert again.status == "already_present" and again.bytes_sent == 0
    models = operator.models().models
    assert [(m.name, m.version, m.manifest_sha256) for m in models] == [("toy", "1.0.0", sha)]


def test_push_a_tar(hub: HubService, operator: HubClient, bundles: Bundles, tmp_path: Path) -> None:
    tar = pack_tar(bundles.v2, tmp_path / "v2.tar")
    assert operator.push(tar).status == "stored"
    assert hub.store.has(bundles.sha(bundles.v2))


def test_untrusted_signer_is_refused(
    hub: HubService, operator: HubClient, bundles: Bundles
) -> None:
    with pytest.raises(ApiFailure) as err:
        operator.push(bundles.untrusted)
    assert err.value.code == "invalid_bundle" and "trusted" in err.value.message
    assert operator.models().models == []
    assert list(hub.store.uploads.iterdir()) == []


def test_tampered_file_is_refused_at_commit(
    hub: HubService, operator: HubClient, bundles: Bundles
) -> None:
    """A client that lies about the bytes (the manifest is genuine): hashes catch it."""
    manifest = (bundles.v1 / MANIFEST_FILE).read_bytes()
    sig = (bundles.v1 / SIGNATURE_FILE).read_bytes()
    begin = PushBeginReply.model_validate(
        operator.call(
            "push.begin",
            PushBeginArgs(
                manifest=base64.b64encode(manifest).decode(),
                signature=base64.b64encode(sig).decode(),
            ),
        )
    )
    assert begin.status == "upload" and begin.upload_id is not None
    for name, f in begin.files.items():
        data = bytearray((bundles.v1 / name).read_bytes())
        if name == "model.bin":
            data[10] ^= 0xFF
        _upload(operator, begin.upload_id, name, 0, bytes(data))
        assert f.offset == 0
    with pytest.raises(ApiFailure) as err:
        operator.call("push.commit", PushCommitArgs(upload_id=begin.upload_id))
    assert err.value.code == "invalid_bundle" and "model.bin" in err.value.message
    assert not hub.store.has(begin.upload_id) and operator.models().models == []


def _upload(client: HubClient, upload_id: str, name: str, offset: int, data: bytes) -> object:
    user = (
        ("upload_id", upload_id),
        ("file", name),
        ("offset", str(offset)),
        ("sha256", hashlib.sha256(data).hexdigest()),
    )
    return client.wait(client.send("upload", data, user), "upload")


def test_upload_refuses_traversal_unknown_files_and_bad_offsets(
    hub: HubService, operator: HubClient, bundles: Bundles
) -> None:
    manifest = (bundles.v1 / MANIFEST_FILE).read_bytes()
    sig = (bundles.v1 / SIGNATURE_FILE).read_bytes()
    begin = PushBeginReply.model_validate(
        operator.call(
            "push.begin",
            PushBeginArgs(
                manifest=base64.b64encode(manifest).decode(),
                signature=base64.b64encode(sig).decode(),
            ),
        )
    )
    assert begin.upload_id is not None
    for name in ("../../evil", "manifest.sig", "extra.txt", "model.xml/../x"):
        with pytest.raises(ApiFailure) as err:
            _upload(operator, begin.upload_id, name, 0, b"x")
        assert err.value.code == "bad_request", name
    with pytest.raises(ApiFailure) as err:
        _upload(operator, "../" + "0" * 61, "model.xml", 0, b"x")
    assert err.value.code == "not_found"
    xml = (bundles.v1 / "model.xml").read_bytes()
    _upload(operator, begin.upload_id, "model.xml", 0, xml[:100])
    with pytest.raises(ApiFailure) as err:
        _upload(operator, begin.upload_id, "model.xml", 0, xml[:100])  # not where we are
    assert err.value.code == "bad_offset"
    # A later push.begin says where to resume.
    again = PushBeginReply.model_validate(
        operator.call(
            "push.begin",
            PushBeginArgs(
                manifest=base64.b64encode(manifest).decode(),
                signature=base64.b64encode(sig).decode(),
            ),
        )
    )
    assert again.files["model.xml"].offset == 100
    assert not any(p.name == "evil" for p in hub.settings.data_dir.rglob("*"))


def test_manifest_listing_an_extra_or_traversal_file_is_refused(
    hub: HubService, operator: HubClient, bundles: Bundles, tmp_path: Path
) -> None:
    import json

    from cellwatch.shared.signing import load_private_key, sign

    key = load_private_key(bundles.keys / "test.key")
    for bad in ("../evil.bin", "extra.bin"):
        m = json.loads((bundles.v1 / MANIFEST_FILE).read_bytes())
        m["files"][bad] = {"sha256": "0" * 64, "size": 1}
        m["version"] = "9.9.9"
        data = json.dumps(m).encode()
        with pytest.raises(ApiFailure) as err:
            operator.call(
                "push.begin",
                PushBeginArgs(
                    manifest=base64.b64encode(data).decode(),
                    signature=base64.b64encode(sign(key, data)).decode(),
                ),
            )
        assert err.value.code == "invalid_bundle" and "not allowed" in err.value.message
    # The CLI's own check refuses a bundle directory with an extra file before uploading.
    local = tmp_path / "extra"
    shutil.copytree(bundles.v1, local)
    (local / "run.sh").write_text("echo hi\n")
    with pytest.raises(Exception, match="not allowed"):
        operator.push(local)


def test_same_version_with_another_manifest_is_a_conflict(
    hub: HubService, operator: HubClient, bundles: Bundles, tmp_path: Path
) -> None:
    from tests.models import write_test_bundle

    operator.push(bundles.v1)
    clash = write_test_bundle(tmp_path / "clash", bundles.keys, version="1.0.0", seed=42)
    with pytest.raises(ApiFailure) as err:
        operator.push(clash)
    assert err.value.code == "conflict"


def test_a_damaged_copy_on_the_hub_is_refused_at_rollout_start_and_pushed_again(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    v1 = ModelRef(name="toy", version="1.0.0", manifest_sha256=bundles.sha(bundles.v1))
    fake_nodes("node-1", model=v1)
    wait_for(lambda: len(operator.nodes().nodes) == 1, what="node-1")
    operator.push(bundles.v2)
    sha = bundles.sha(bundles.v2)
    stored = hub.store.path(sha) / "model.bin"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))  # a bad sector
    with pytest.raises(ApiFailure) as err:
        operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0"))
    assert err.value.code == "invalid_bundle" and "push the bundle again" in err.value.message
    assert not hub.store.has(sha)  # removed, not served to any node
    assert operator.push(bundles.v2).status == "stored"  # the upload starts over
    assert operator.rollout_start(RolloutStartArgs(name="toy", version="2.0.0")).state == "running"
