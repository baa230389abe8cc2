"""Ed25519 keys for signing bundle manifests (via `cryptography`).

A key pair is two PEM files: `NAME.key` (private, mode 0600) and `NAME.pub`. A
trusted-keys directory holds `*.pub` files; a key is named by its key id, the first
16 hex digits of the SHA-256 of its raw public bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cellwatch.shared.errors import BundleError, SignatureError

SIGNATURE_BYTES = 64


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.key and NAME.pub into directory; returns (private, public) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise BundleError(f"key {name!r} already exists in {directory} (use --force to replace)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    return private_key.sign(data)


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a hub or node accepts bundle signatures from."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def load(cls, directory: Path | None) -> TrustedKeys:
        """Every `*.pub` in directory (none when directory is None)."""
        if directory is None:
            return cls({})
        if not directory.is_dir():
            raise SignatureError(f"trusted keys directory {directory} does not exist")
        keys = {}
        for path in sorted(directory.glob("*.pub")):
            key = load_public_key(path)
            keys[key_id(key)] = key
        return cls(keys)

    def verify(self, data: bytes, signature: bytes) -> str:
        """The key id that signed data; SignatureError if no trusted key did."""
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
        if not self.keys:
            raise SignatureError("no trusted keys configured: cannot verify the signature")
        for kid, key in self.keys.items():
            try:
                key.verify(signature, data)
            except InvalidSignature:
                continue
            return kid
        raise SignatureError("signature does not match any trusted key")
