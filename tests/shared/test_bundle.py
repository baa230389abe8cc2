from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from cellwatch.shared.bundle import load_bundle, pack_tar, unpack_tar
from cellwatch.shared.errors import BundleError, SignatureError
from cellwatch.shared.signing import TrustedKeys, generate_keypair
from tests.models import write_test_bundle


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bundle")
    return write_test_bundle(root / "b", root / "keys"), root / "keys"


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_signed_bundle_verifies(signed: tuple[Path, Path]) -> None:
    path, keys = signed
    b = load_bundle(path, TrustedKeys.load(keys))
    assert b.signer is not None and b.manifest.labels == ["normal", "ALL"]
    assert set(b.manifest.files) == {"model.xml", "model.bin", "golden.npz"}


def test_untrusted_signer_refused(signed: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = signed
    generate_keypair(tmp_path / "other", "other")
    with pytest.raises(SignatureError, match="does not match any trusted key"):
        load_bundle(path, TrustedKeys.load(tmp_path / "other"))
    with pytest.raises(SignatureError, match="no trusted keys"):
        load_bundle(path, TrustedKeys.load(None))


def test_unsigned_refused_unless_dev_switch(signed: tuple[Path, Path], tmp_path: Path) -> None:
    path, keys = signed
    b = copy(path, tmp_path / "b")
    (b / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match=r"no manifest\.sig"):
        load_bundle(b, TrustedKeys.load(keys))
    assert load_bundle(b, TrustedKeys.load(keys), allow_unsigned=True).signer is None


def test_tampered_file_refused(signed: tuple[Path, Path], tmp_path: Path) -> None:
    path, keys = signed
    b = copy(path, tmp_path / "b")
    data = bytearray((b / "model.bin").read_bytes())
    data[100] ^= 0xFF
    (b / "model.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(b, TrustedKeys.load(keys), allow_unsigned=True)


def test_tampered_manifest_refused(signed: tuple[Path, Path], tmp_path: Path) -> None:
    path, keys = signed
    b = copy(path, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["low_confidence_threshold"] = 0.1
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SignatureError):
        load_bundle(b, TrustedKeys.load(keys))


def test_extra_file_refused(signed: tuple[Path, Path], tmp_path: Path) -> None:
    path, keys = signed
    b = copy(path, tmp_path / "b")
    (b / "run.sh").write_text("echo hi")
    with pytest.raises(BundleError, match=r"unexpected entry 'run\.sh'"):
        load_bundle(b, TrustedKeys.load(keys))


def test_tar_round_trip_and_traversal(signed: tuple[Path, Path], tmp_path: Path) -> None:
    path, keys = signed
    tar = pack_tar(path, tmp_path / "b.tar")
    out = unpack_tar(tar, tmp_path / "unpacked")
    assert load_bundle(out, TrustedKeys.load(keys)).manifest_sha256
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        t.add(path / "model.xml", arcname="../model.xml")
    with pytest.raises(BundleError, match="not allowed"):
        unpack_tar(evil, tmp_path / "evil-out")
    assert not (tmp_path / "model.xml").exists()
