"""Field samples from a node to the hub (issue 20): the messages of the upload.

A node uploads each spooled sample (node/sampleupload.py) in two steps, on topics only
it may write (`{prefix}/hub/samples/{node_id}/offer` and `.../chunk`, deploy/mkacl.sh),
with the Response Topic `{prefix}/nodes/{node_id}/samples` (only the hub writes it, only
that node reads it). Every answer is an `ApiReply` (ok with data, or an error code):

1. offer: `SampleOffer` {record, size}. The hub answers `SampleOfferReply`: `stored`
   (it has this sample id: nothing to send; the node deletes its copy) or `upload` with
   the offset it already has (an upload cut short resumes there). The record's `node`
   must be the node of the topic.
2. chunks: the PNG's bytes in the one chunk format (shared/rpc/transfer.py: user
   properties offset, sha256, total) with the user property `sample` (its id), one at a
   time; each answered `SampleAck` {offset, stored}. With the last chunk the hub checks
   the file's SHA-256 against the id, moves it into its store under `<id>.png` and
   records the sample in its database before it answers `stored: true`: only then does
   the node delete its copy. Content-addressed: a second upload of an id is one sample.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cellwatch.shared.samples import SampleRow
from cellwatch.shared.schemas import Message

SAMPLE_PROPERTY = "sample"
"""The chunk's user property naming the sample id it belongs to."""
MAX_SAMPLE_BYTES = 64 * 1024 * 1024
"""A sample's PNG at most (a 6000x4000 RGB image is 72 MB raw; microscope fields are smaller)."""
MAX_OFFER_BYTES = 4096
"""An offer's payload at most."""


class SampleOffer(Message):
    record: SampleRow
    size: int = Field(ge=1, le=MAX_SAMPLE_BYTES, description="the PNG's bytes")


class SampleOfferReply(Message):
    status: Literal["stored", "upload"]
    offset: int = Field(0, ge=0, description="bytes the hub has of it (upload)")


class SampleAck(Message):
    offset: int = Field(ge=0, description="bytes the hub has now")
    stored: bool = Field(description="the sample is complete, checked and recorded")
