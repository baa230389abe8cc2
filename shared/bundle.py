"""Reading, verifying and writing model bundles (DESIGN.md, Model bundle).

`load_bundle` is the one gate every consumer (node startup, node update agent, hub
push) goes through: only the listed file names, bounded sizes, a signature from a
trusted key over the exact manifest bytes, and every file's SHA-256 checked before
anything is used. Nothing in a bundle is executed or unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from cellwatch.shared.base import first_problem
from cellwatch.shared.errors import BundleError, SignatureError
from cellwatch.shared.limits import MAX_BUNDLE_FILE_BYTES, MAX_MANIFEST_BYTES
from cellwatch.shared.manifest import (
    BUNDLE_FILES,
    MANIFEST_FILE,
    PAYLOAD_FILES,
    SIGNATURE_FILE,
    FileEntry,
    Manifest,
)
from cellwatch.shared.schemas import ModelRef
from cellwatch.shared.signing import SIGNATURE_BYTES, TrustedKeys, sign

log = logging.getLogger(__name__)

_HASH_BLOCK = 1024 * 1024


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed every check; its files may be used."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    manifest_sha256: str
    signer: str | None
    """Key id of the trusted key that signed it; None if accepted unsigned (dev switch)."""

    @functools.cached_property
    def ref(self) -> ModelRef:
        """The bundle's identity (built once: every Result carries it)."""
        return ModelRef(
            name=self.manifest.name,
            version=self.manifest.version,
            manifest_sha256=self.manifest_sha256,
        )

    def file(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise BundleError(f"{name} is not part of bundle {self.manifest.name}")
        return self.path / name

    def __str__(self) -> str:
        return f"{self.manifest.name} {self.manifest.version} ({self.manifest_sha256[:12]})"


def check_file_name(name: str) -> str:
    """Return name if a bundle may contain it; BundleError otherwise (no paths)."""
    if name not in BUNDLE_FILES:
        raise BundleError(
            f"file name {name!r} is not allowed in a bundle (allowed: {BUNDLE_FILES})"
        )
    return name


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest bytes (size-limited) into a Manifest."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"manifest.json is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit"
        )
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(f"invalid manifest.json: {first_problem(exc, 'manifest')}") from exc


def verify_signature(
    manifest_bytes: bytes, signature: bytes | None, trusted: TrustedKeys, *, allow_unsigned: bool
) -> str | None:
    """Key id that signed the manifest, or None when accepted unsigned (dev switch only)."""
    if signature is None:
        if allow_unsigned:
            log.warning("accepting an UNSIGNED bundle (allow_unsigned is on: development only)")
            return None
        raise SignatureError("bundle has no manifest.sig and unsigned bundles are not allowed")
    try:
        return trusted.verify(manifest_bytes, signature)
    except SignatureError:
        if allow_unsigned:
            log.warning("bundle signature not trusted; accepting it because allow_unsigned is on")
            return None
        raise


def load_bundle(path: Path, trusted: TrustedKeys, *, allow_unsigned: bool = False) -> Bundle:
    """Verify the bundle directory at path and return it; BundleError says what failed."""
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    for entry in path.iterdir():
        if entry.name not in BUNDLE_FILES or not entry.is_file() or entry.is_symlink():
            raise BundleError(f"unexpected entry {entry.name!r} in bundle {path}")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{path} has no {MANIFEST_FILE}")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path} is over the {MAX_MANIFEST_BYTES}-byte limit")
    manifest_bytes = manifest_path.read_bytes()
    sig_path = path / SIGNATURE_FILE
    signature = sig_path.read_bytes()[: SIGNATURE_BYTES + 1] if sig_path.is_file() else None
    signer = verify_signature(manifest_bytes, signature, trusted, allow_unsigned=allow_unsigned)
    manifest = parse_manifest(manifest_bytes)
    for name, file_entry in manifest.files.items():
        verify_file(path / name, file_entry)
    bundle = Bundle(path, manifest, manifest_bytes, sha256_bytes(manifest_bytes), signer)
    log.info("bundle %s verified (signer %s)", bundle, signer or "none")
    return bundle


def verify_file(path: Path, entry: FileEntry) -> None:
    if not path.is_file():
        raise BundleError(f"bundle file {path.name} is missing")
    size = path.stat().st_size
    if size != entry.size:
        raise BundleError(f"{path.name}: size {size} does not match the manifest's {entry.size}")
    if sha256_file(path) != entry.sha256:
        raise BundleError(f"{path.name}: SHA-256 does not match the manifest (tampered?)")


def hash_files(directory: Path, names: Iterable[str] = PAYLOAD_FILES) -> dict[str, FileEntry]:
    """FileEntry for each named file that exists in directory."""
    files = {}
    for name in names:
        p = directory / check_file_name(name)
        if p.is_file():
            size = p.stat().st_size
            if size > MAX_BUNDLE_FILE_BYTES:
                raise BundleError(f"{name} is {size} bytes, over the bundle file limit")
            files[name] = FileEntry(sha256=sha256_file(p), size=size)
    return files


def write_manifest(directory: Path, manifest: Manifest, key: Ed25519PrivateKey | None) -> bytes:
    """Write manifest.json (and manifest.sig when key is given); returns the manifest bytes."""
    data = manifest.to_json()
    (directory / MANIFEST_FILE).write_bytes(data)
    sig_path = directory / SIGNATURE_FILE
    if key is not None:
        sig_path.write_bytes(sign(key, data))
    elif sig_path.exists():
        sig_path.unlink()
    return data


def resign_bundle(directory: Path, key: Ed25519PrivateKey) -> str:
    """Sign the bundle in directory again with key (a key rotation): the exact bytes of
    its manifest.json, so its identity (the manifest's SHA-256) stays. Every file is
    checked against the manifest first: a damaged bundle is never signed (BundleError).
    Returns the sha256 of the manifest."""
    manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
    manifest = parse_manifest(manifest_bytes)
    for name, entry in manifest.files.items():
        verify_file(directory / name, entry)
    sig = directory / SIGNATURE_FILE
    tmp = sig.with_name(SIGNATURE_FILE + ".tmp")
    tmp.write_bytes(sign(key, manifest_bytes))
    os.replace(tmp, sig)
    return sha256_bytes(manifest_bytes)


def pack_tar(bundle_dir: Path, out: Path) -> Path:
    """Write the bundle as an uncompressed tar of its files (no directories)."""
    with tarfile.open(out, "w") as tar:
        for name in BUNDLE_FILES:
            p = bundle_dir / name
            if p.is_file():
                tar.add(p, arcname=name, recursive=False)
    return out


def unpack_tar(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar into dest after checking every member's name, type and size."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
            for m in members:
                check_file_name(m.name)
                if not m.isreg():
                    raise BundleError(f"tar member {m.name!r} is not a regular file")
                if m.size > MAX_BUNDLE_FILE_BYTES:
                    raise BundleError(f"tar member {m.name!r} is too large")
            tar.extractall(dest, members=members, filter="data")
    except tarfile.TarError as exc:
        raise BundleError(f"cannot read bundle tar {tar_path}: {exc}") from exc
    return dest
