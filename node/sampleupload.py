"""The node's field samples to the hub, in the background (issue 20; the protocol is
shared/sampletransfer.py's).

One thread takes the spooled samples oldest first (node/samples.py). For each: an
offer (the record and size; the hub answers `stored` or the offset it has), then the
PNG from that offset through the one chunk transfer (shared/rpc/transfer.py `Upload`,
one chunk in flight), and the local copy is deleted only once the hub answered
`stored`. A node killed mid-upload offers the sample again at its next start and sends
the rest; the hub stores it under its id, so it is never twice.

- Bandwidth: after each acknowledged chunk the thread waits until the bytes sent are
  within `samples.upload_bytes_per_s` of the time taken.
- Never while live images wait: before an offer and between chunks it waits until no
  image is without its Result (`backlog() == 0`).
- A refusal or no answer (the hub down, its store over quota) ends that upload; the
  thread tries again `samples.retry_s` later. A sample the hub says does not hash to
  its id is checked here: if the file changed on disk, it is quarantined as corrupt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from cellwatch.node.config import SamplesSettings
from cellwatch.node.errors import NodeError
from cellwatch.node.samples import SampleKeeper
from cellwatch.node.spool import Spooled
from cellwatch.shared.mqtt import Message, MqttClient
from cellwatch.shared.rpc import Reply, RequestPolicy, Route, Rpc, RpcError
from cellwatch.shared.rpc.transfer import Upload
from cellwatch.shared.samples import sample_id
from cellwatch.shared.sampletransfer import (
    SAMPLE_PROPERTY,
    SampleAck,
    SampleOffer,
    SampleOfferReply,
)
from cellwatch.shared.schemas import ApiReply
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)

BACKLOG_POLL_S = 0.2
"""How often a waiting upload looks whether the live images were answered."""


class UploadFailed(NodeError):
    """The hub refused a step or did not answer."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class UploadStopped(NodeError):
    """The node is stopping."""


def _parse(message: Message) -> ApiReply:
    return ApiReply.model_validate_json(message.payload)


class SampleUploader:
    def __init__(
        self,
        settings: SamplesSettings,
        *,
        mqtt: MqttClient,
        topics: Topics,
        node_id: str,
        keeper: SampleKeeper,
        backlog: Callable[[], int],
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.mqtt = mqtt
        self.topics = topics
        self.node_id = node_id
        self.keeper = keeper
        self.spool = keeper.spool
        self.backlog = backlog
        self._stop = stop
        self.rpc = Rpc(mqtt, topics.samples_reply(node_id), window=2, name=f"{node_id}-samples")
        timeout = settings.chunk_timeout_s
        self.offer_policy = RequestPolicy(
            timeout_s=timeout, retry_after_s=timeout / 3, max_attempts=3
        )
        self.chunk_policy = RequestPolicy(timeout_s=timeout, retry_after_s=timeout, max_attempts=1)

    def route(self) -> Route[bytes]:
        """The edge route of this node's samples reply topic (the hub's answers)."""
        return self.rpc.route()

    def close(self) -> None:
        self.rpc.close()

    # -- the thread ----------------------------------------------------------------------
    def run(self) -> None:
        """Until the node stops: upload what is spooled; idle, wait for the keeper."""
        while not self._stop.is_set():
            pending = self.spool.pending()
            if not pending or not self.mqtt.connected:
                self.keeper.written.wait(self.settings.retry_s)
                self.keeper.written.clear()
                continue
            try:
                for spooled in pending:
                    self.upload(spooled)
            except UploadStopped:
                return
            except (UploadFailed, RpcError, OSError, ValueError) as exc:
                log.warning(
                    "node %s: samples: upload paused for %.0f s: %s",
                    self.node_id,
                    self.settings.retry_s,
                    exc,
                )
                self._stop.wait(self.settings.retry_s)

    def upload(self, spooled: Spooled) -> None:
        """One sample to the hub; deleted here once the hub says it has it."""
        row = spooled.row
        self._wait_for_no_backlog()
        offer = SampleOffer(record=row, size=spooled.size)
        future = self.rpc.submit(
            self.topics.hub_samples_offer(self.node_id),
            offer.to_json(),
            _parse,
            self.offer_policy,
        )
        answer = SampleOfferReply.model_validate(self._wait(future, "offer", row.id))
        if answer.status == "upload":
            if answer.offset:
                log.info(
                    "node %s: samples: resuming %s at byte %d",
                    self.node_id,
                    row.id[:12],
                    answer.offset,
                )
            acks: list[SampleAck] = []
            started, sent_before = time.monotonic(), answer.offset

            def confirm(f: Future[Reply[ApiReply]]) -> None:
                acks.append(SampleAck.model_validate(self._wait(f, "chunk", row.id)))

            def pace(sent: int) -> None:
                self._pace(started, sent)
                self._wait_for_no_backlog()

            Upload(
                rpc=self.rpc,
                topic=self.topics.hub_samples_chunk(self.node_id),
                naming=((SAMPLE_PROPERTY, row.id),),
                path=self.spool.png(row.id),
                start=sent_before,
                size=spooled.size,
                chunk_bytes=self.settings.chunk_bytes,
                window=1,
                parse=_parse,
                policy=self.chunk_policy,
                confirm=confirm,
                progress=pace,
            ).run()
            if not (acks and acks[-1].stored):
                raise UploadFailed(f"the hub did not store {row.id[:12]}")
        self.spool.remove(row.id)
        self.keeper.count_uploaded()
        log.info("node %s: samples: %s uploaded", self.node_id, row.id[:12])

    def _wait(self, future: Future[Reply[ApiReply]], what: str, sample: str) -> object:
        while True:
            if self._stop.is_set():
                future.cancel()
                raise UploadStopped("stopping")
            try:
                reply = future.result(timeout=BACKLOG_POLL_S).value
                break
            except FutureTimeout:
                continue
            except RpcError as exc:
                raise UploadFailed(f"{what} of {sample[:12]}: {exc}") from exc
        if reply.ok:
            return reply.data
        code = reply.error.code if reply.error else "unknown"
        message = reply.error.message if reply.error else ""
        if what == "chunk" and code == "bad_request" and self._corrupt(sample):
            raise UploadFailed(f"{sample[:12]} is corrupt on this node's disk", code)
        raise UploadFailed(f"the hub refused the {what} of {sample[:12]}: {code}: {message}", code)

    def _corrupt(self, sample: str) -> bool:
        try:
            intact = sample_id(self.spool.png(sample).read_bytes()) == sample
        except OSError:
            intact = False
        if not intact:
            self.spool.corrupt(sample)
        return not intact

    def _pace(self, started: float, sent: int) -> None:
        """Wait until sent bytes are within the bandwidth bound."""
        due = started + sent / self.settings.upload_bytes_per_s
        wait = due - time.monotonic()
        if wait > 0 and self._stop.wait(wait):
            raise UploadStopped("stopping")

    def _wait_for_no_backlog(self) -> None:
        while self.backlog() > 0:
            if self._stop.wait(BACKLOG_POLL_S):
                raise UploadStopped("stopping")
        if self._stop.is_set():
            raise UploadStopped("stopping")
