"""A site relay's copy of the hub's signed revocation list: read back from its cache
directory at start, merged with each list the hub publishes (an entry no trusted key
signed is refused and logged, a known one is never dropped), and stored again when it
changed. hub/relay.py removes the revoked bundles from its cache and answers their
files `revoked`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import ValidationError

from cellwatch.shared.revocations import merge as merge_revocations
from cellwatch.shared.schemas import RevocationList
from cellwatch.shared.signing import TrustedKeys

log = logging.getLogger(__name__)

REVOKED_FILE = "revoked.json"


class RelayRevocations:
    """The revocations a relay knows (`shas`: the revoked bundles' manifest sha256)."""

    def __init__(
        self, cache_dir: Path, trusted: TrustedKeys, relay_id: str, *, allow_unsigned: bool
    ) -> None:
        self.path = cache_dir / REVOKED_FILE
        self.trusted = trusted
        self.relay_id = relay_id
        self.allow_unsigned = allow_unsigned
        self._known = self._load()
        self.shas: frozenset[str] = self._known.shas() if self._known is not None else frozenset()

    def _load(self) -> RevocationList | None:
        path = self.path
        try:
            return RevocationList.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, json.JSONDecodeError) as exc:
            log.error("relay: %s is unreadable (%s): ignored until the hub sends it", path, exc)
            return None

    def merge(self, incoming: RevocationList) -> list[str]:
        """Take a list from the hub; returns the bundles (manifest sha256) it newly revokes."""
        merged = merge_revocations(
            self._known, incoming, self.trusted, allow_unsigned=self.allow_unsigned
        )
        for rev, why in merged.refused:
            log.error(
                "relay %s: revocation of %s %s refused: %s",
                self.relay_id,
                rev.name,
                rev.version,
                why,
            )
        if self._known is None or merged.added:
            path = self.path
            tmp = path.with_name(path.name + ".tmp")
            try:
                tmp.write_bytes(merged.known.to_json())
                tmp.replace(path)
            except OSError as exc:
                log.error("relay %s: cannot store the revocation list: %s", self.relay_id, exc)
        self._known = merged.known
        self.shas = merged.known.shas()
        return [rev.manifest_sha256 for rev in merged.added]
