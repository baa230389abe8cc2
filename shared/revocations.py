"""Signed revocations: made by whoever holds a release key (`cellwatch-hub models
revoke --sign-key`), checked by the hub and every node against their trusted keys,
and merged so that a revocation once known is never dropped (DESIGN.md, Trust).

A revocation is final: a list that leaves out one we know (a hub restored from an
older backup, an impostor) is refused as a replacement, logged, and only its new,
correctly signed revocations are taken from it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cellwatch.shared.errors import SignatureError
from cellwatch.shared.schemas import ModelRef, Revocation, RevocationList, utcnow
from cellwatch.shared.signing import TrustedKeys, key_id, sign


def sign_revocation(
    private_key: Ed25519PrivateKey, model: ModelRef, reason: str, revoked_at: datetime | None = None
) -> Revocation:
    """The revocation of model, signed with private_key (a release key)."""
    unsigned = Revocation(
        name=model.name,
        version=model.version,
        manifest_sha256=model.manifest_sha256,
        reason=reason,
        revoked_at=revoked_at or utcnow(),
    )
    signature = sign(private_key, unsigned.signed_bytes())
    return unsigned.model_copy(
        update={
            "key_id": key_id(private_key.public_key()),
            "signature": base64.b64encode(signature).decode(),
        }
    )


def verify_revocation(rev: Revocation, trusted: TrustedKeys) -> str:
    """The id of the trusted key that signed rev; SignatureError if none did."""
    if rev.signature is None:
        raise SignatureError("it is not signed")
    try:
        signature = base64.b64decode(rev.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("its signature is not valid base64") from exc
    return trusted.verify(rev.signed_bytes(), signature)


@dataclass
class Merged:
    """What merge() made of an incoming list."""

    known: RevocationList
    """Every revocation known now: the ones known before, and the incoming ones that
    are new and signed by a trusted key."""
    added: list[Revocation] = field(default_factory=list)
    dropped: list[Revocation] = field(default_factory=list)
    """Known revocations the incoming list left out (they stay known)."""
    refused: list[tuple[Revocation, str]] = field(default_factory=list)
    """New incoming revocations that are not taken, and why."""


def merge(
    known: RevocationList | None,
    incoming: RevocationList,
    trusted: TrustedKeys,
    *,
    allow_unsigned: bool = False,
) -> Merged:
    """Add incoming's new revocations that a trusted key signed (or, with the
    development switch allow_unsigned, any); never remove a known one."""
    before = list(known.revoked) if known is not None else []
    shas = {r.manifest_sha256 for r in before}
    out = Merged(known=RevocationList(revoked=before, issued_at=incoming.issued_at))
    seen: set[str] = set()
    for rev in incoming.revoked:
        sha = rev.manifest_sha256
        seen.add(sha)
        if sha in shas:
            continue
        try:
            verify_revocation(rev, trusted)
        except SignatureError as exc:
            if not allow_unsigned:
                out.refused.append((rev, str(exc)))
                continue
        shas.add(sha)
        out.added.append(rev)
    out.dropped = [r for r in before if r.manifest_sha256 not in seen]
    out.known = RevocationList(revoked=before + out.added, issued_at=incoming.issued_at)
    return out
