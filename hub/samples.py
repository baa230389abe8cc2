"""The hub's field samples (issue 20): the store the nodes upload into, and what the
labelling CLI reads and writes (`cellwatch-hub samples ...`, hub/samplecli.py).

`{data_dir}/samples/<id>.png`, content-addressed (shared/samples.py: the id is the PNG's
SHA-256), each recorded in the hub database's `samples` table with its record
(shared.samples.SampleRow) and, once imported, its label. Uploads in progress wait in
`samples/uploads/`: `<id>.json` (the offer) and `<id>.png.part` (the bytes received,
in order, so an upload cut short by either side resumes at its size). The protocol is
shared/sampletransfer.py's; every step is idempotent:

- an offer of an id the hub has is answered `stored` (a node that lost the last
  answer deletes its copy); an image in the store without its row (a hub stopped
  between the rename and the database) is recorded then;
- two nodes that kept the same image (the same id) share one upload: the first offer's
  record is kept, chunks from either append in order (one that comes out of order is
  refused `bad_offset`, and its node offers again later), and the bytes are checked
  against the id at the end whoever sent them;
- the last chunk is checked against the id (SHA-256), fsynced, renamed into the store
  and recorded before it is answered: an acknowledged sample survives a hub restart;
- a sample that would take the store over `samples.quota_mb` is refused (`quota`: the
  node keeps it and tries later); samples collected more than `samples.retention_days`
  ago are deleted (files and rows) at every offer and at start.

Only the hub's account reads the upload topics (deploy/mkacl.sh); the store directory is
the hub's own (mode 0700).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pydantic import ValidationError

from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.rpc.transfer import Chunk, PartFile, TransferError
from cellwatch.shared.samples import sample_file_name, sample_id
from cellwatch.shared.sampletransfer import SampleAck, SampleOffer, SampleOfferReply

log = logging.getLogger(__name__)

UPLOADS = "uploads"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
DAY_S = 86400.0


class SampleStore:
    def __init__(self, db: Database, root: Path, quota_bytes: int, retention_s: float) -> None:
        self.db = db
        self.root = root
        self.uploads = root / UPLOADS
        self.quota_bytes = quota_bytes
        self.retention_s = retention_s
        self.uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)

    def path(self, sample: str) -> Path:
        return self.root / sample_file_name(sample)

    def _offer_path(self, sample: str) -> Path:
        return self.uploads / f"{sample}.json"

    def _part(self, sample: str, size: int) -> PartFile:
        return PartFile(self.uploads / sample_file_name(sample), size)

    # -- the nodes' uploads (control thread) ----------------------------------------------
    def offer(self, node_id: str, offer: SampleOffer, now: float) -> SampleOfferReply:
        row = offer.record
        if row.node != node_id:
            raise ApiFailure(
                ApiErrorCode.BAD_REQUEST, f"the sample names node {row.node}, not {node_id}"
            )
        self.expire(now)
        if self.db.has_sample(row.id):
            return SampleOfferReply(status="stored")
        if self.path(row.id).is_file() and sample_id(self.path(row.id).read_bytes()) == row.id:
            self.db.add_sample(row, offer.size, now)  # stored before a stop, not yet recorded
            return SampleOfferReply(status="stored")
        used = self.db.sample_bytes()
        if used + offer.size > self.quota_bytes:
            raise ApiFailure(
                ApiErrorCode.QUOTA,
                f"the samples store holds {used} bytes; {offer.size} more is over its quota "
                f"({self.quota_bytes})",
            )
        record = self._offer_path(row.id)
        if not record.exists():
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_bytes(offer.to_json())
            os.replace(tmp, record)
        return SampleOfferReply(status="upload", offset=self._part(row.id, offer.size).received())

    def chunk(self, node_id: str, sample: str, chunk: Chunk, now: float) -> SampleAck:
        try:
            if not _SHA_RE.match(sample):
                raise ValueError(sample)
            offer = SampleOffer.model_validate_json(self._offer_path(sample).read_bytes())
        except (OSError, ValueError, ValidationError):
            if self.db.has_sample(sample):
                return SampleAck(offset=chunk.offset, stored=True)
            raise ApiFailure(
                ApiErrorCode.NOT_FOUND, f"no offer of sample {sample[:12]}: offer it first"
            ) from None
        if chunk.total is not None and chunk.total != offer.size:
            raise ApiFailure(
                ApiErrorCode.BAD_REQUEST,
                f"the offer says {offer.size} bytes, the chunk {chunk.total}",
            )
        part = self._part(sample, offer.size)
        try:
            done = part.append(chunk.offset, chunk.data)
        except TransferError as exc:
            raise ApiFailure(ApiErrorCode.BAD_OFFSET, str(exc)) from exc
        if done < offer.size:
            return SampleAck(offset=done, stored=False)
        return self._complete(offer, now)

    def _complete(self, offer: SampleOffer, now: float) -> SampleAck:
        row = offer.record
        upload = self.uploads / sample_file_name(row.id)
        if sample_id(upload.read_bytes()) != row.id:
            upload.unlink(missing_ok=True)
            raise ApiFailure(
                ApiErrorCode.BAD_REQUEST, f"sample {row.id[:12]}: the bytes do not hash to its id"
            )
        os.replace(upload, self.path(row.id))  # fsynced by PartFile.complete
        self.db.add_sample(row, offer.size, now)
        self._offer_path(row.id).unlink(missing_ok=True)
        log.info(
            "hub: sample %s from node %s stored (%s, source %s)",
            row.id[:12],
            row.node,
            row.reason.value,
            row.source,
        )
        return SampleAck(offset=offer.size, stored=True)

    # -- retention -----------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Delete samples collected before the retention period; how many."""
        old = self.db.samples_collected_before(now - self.retention_s)
        if old:
            for sample in old:
                self.path(sample).unlink(missing_ok=True)
            self.db.delete_samples(old)
            log.info("hub: %d samples past their retention deleted", len(old))
        for stale in self.uploads.iterdir():
            if stale.stat().st_mtime < now - self.retention_s:
                stale.unlink(missing_ok=True)
        return len(old)
