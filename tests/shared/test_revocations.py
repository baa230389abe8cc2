"""Signed revocations (shared/revocations.py): what a release key signs, and the merge
that never drops a known revocation and takes no unsigned or forged one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cellwatch.shared.errors import SignatureError
from cellwatch.shared.revocations import merge, sign_revocation, verify_revocation
from cellwatch.shared.schemas import ModelRef, Revocation, RevocationList
from cellwatch.shared.signing import TrustedKeys, generate_keypair, load_private_key

NOW = datetime(2026, 12, 1, 8, 0, 0, 123456, tzinfo=UTC)


def model(version: str, fill: str) -> ModelRef:
    return ModelRef(name="toy", version=version, manifest_sha256=fill * 64)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[TrustedKeys, Path, Path]:
    private, _ = generate_keypair(tmp_path / "trusted", "release")
    other, _ = generate_keypair(tmp_path / "other", "mallory")
    return TrustedKeys.load(tmp_path / "trusted"), private, other


def test_a_signature_survives_the_wire_and_covers_every_field(
    keys: tuple[TrustedKeys, Path, Path],
) -> None:
    trusted, private, other = keys
    rev = sign_revocation(load_private_key(private), model("2.0.0", "a"), "bad", NOW)
    wire = RevocationList(revoked=[rev], issued_at=NOW).to_json()
    back = RevocationList.model_validate_json(wire).revoked[0]
    assert verify_revocation(back, trusted) == rev.key_id
    for change in ({"reason": "fine after all"}, {"manifest_sha256": "b" * 64}):
        with pytest.raises(SignatureError):
            verify_revocation(back.model_copy(update=change), trusted)
    forged = sign_revocation(load_private_key(other), model("2.0.0", "a"), "bad", NOW)
    with pytest.raises(SignatureError):
        verify_revocation(forged, trusted)
    with pytest.raises(SignatureError, match="not signed"):
        verify_revocation(Revocation(**rev.model_dump(exclude={"signature"})), trusted)


def test_merge_never_drops_a_known_revocation_and_takes_only_signed_ones(
    keys: tuple[TrustedKeys, Path, Path],
) -> None:
    trusted, private, other = keys
    key = load_private_key(private)
    a = sign_revocation(key, model("1.0.0", "a"), "old", NOW)
    b = sign_revocation(key, model("2.0.0", "b"), "new", NOW)
    forged = sign_revocation(load_private_key(other), model("3.0.0", "c"), "forged", NOW)
    unsigned = sign_revocation(key, model("4.0.0", "d"), "x", NOW).model_copy(
        update={"signature": None}
    )
    known = RevocationList(revoked=[a], issued_at=NOW)
    incoming = RevocationList(revoked=[b, forged, unsigned], issued_at=NOW)
    out = merge(known, incoming, trusted)
    assert [r.version for r in out.known.revoked] == ["1.0.0", "2.0.0"]
    assert out.added == [b] and out.dropped == [a]
    assert [r.version for r, _ in out.refused] == ["3.0.0", "4.0.0"]
    # An empty list (a hub restored from a backup older than the revocation).
    empty = merge(out.known, RevocationList(revoked=[], issued_at=NOW), trusted)
    assert empty.known.shas() == out.known.shas() and len(empty.dropped) == 2
    # The development switch takes unsigned ones too.
    lax = merge(None, incoming, trusted, allow_unsigned=True)
    assert len(lax.known.revoked) == 3 and lax.refused == []
