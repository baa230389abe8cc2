"""Downloads bundle files from the hub in chunks over MQTT (DESIGN.md, Rollout).

One file at a time, up to `window` FetchRequests in flight, through the shared
request/response layer (`cellwatch.shared.rpc`, `cellwatch.shared.rpc.transfer`):

- requests go to `{prefix}/hub/fetch/{node_id}` with Response Topic
  `{prefix}/nodes/{node_id}/fetch`; the topic says which node asks;
- each chunk is checked against its `sha256` user property and appended to
  `{file}.part` in order, so a download interrupted by a disconnect or a node
  restart resumes at the last good offset;
- the download advances by the bytes it received: when the hub sends less than
  asked (its `max_chunk_bytes`), the rest is asked for again and later requests use
  the size the hub sends;
- a file's size must equal the manifest's (`expected_size`);
- a chunk without an answer is asked for again after `timeout_s`; when a chunk has
  had no answer for `stall_timeout_s`, the download fails with FetchError (the
  update agent reports `fetch_failed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cellwatch.node.errors import NodeError
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.limits import FETCH_CHUNK_BYTES
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.rpc import RemoteError, Route, Rpc
from cellwatch.shared.rpc.transfer import Download, TransferCancelled, TransferError, chunk_policy
from cellwatch.shared.schemas import FetchRequest
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)


class FetchError(NodeError):
    """The hub refused a request, contradicted the manifest, or stopped answering."""

    def __init__(self, message: str, *, revoked: bool = False) -> None:
        super().__init__(message)
        self.revoked = revoked
        """The hub refused it because the bundle was revoked."""


class FetchCancelled(NodeError):
    """A newer desired model superseded this download."""


class Fetcher:
    def __init__(
        self,
        mqtt: MqttClient,
        topics: Topics,
        node_id: str,
        *,
        window: int = 4,
        chunk_bytes: int = FETCH_CHUNK_BYTES,
        timeout_s: float = 10.0,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self.topics = topics
        self.node_id = node_id
        self.window = window
        self.chunk_bytes = chunk_bytes
        self.policy = chunk_policy(timeout_s, max(stall_timeout_s, timeout_s))
        self.rpc = Rpc(mqtt, topics.fetch_reply(node_id), window=window, name=f"{node_id}-fetch")
        self._request_topic = topics.hub_fetch(node_id)
        self._received_before = 0
        self._current: Download | None = None

    @property
    def bytes_received(self) -> int:
        """Chunk bytes received (hash-checked) since start."""
        current = self._current
        return self._received_before + (current.received if current is not None else 0)

    def route(self) -> Route[bytes]:
        """The edge route of this node's fetch reply topic (chunks for the rpc)."""
        return self.rpc.route()

    def close(self) -> None:
        self.rpc.close()

    def fetch(
        self,
        sha: str,
        name: str,
        dest: Path,
        *,
        expected_size: int | None = None,
        max_size: int | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> int:
        """Download file `name` of bundle `sha` to dest (resuming dest.part); its size."""

        def request_for(offset: int, length: int) -> tuple[str, bytes]:
            req = FetchRequest(manifest_sha256=sha, file=name, offset=offset, length=length)
            return self._request_topic, req.to_json()

        part = dest.with_name(dest.name + ".part")
        if part.exists() and part.stat().st_size:
            log.info(
                "node %s: resuming %s of %s at byte %d",
                self.node_id,
                name,
                sha[:12],
                part.stat().st_size,
            )
        download = Download(
            rpc=self.rpc,
            request_for=request_for,
            dest=dest,
            chunk_bytes=self.chunk_bytes,
            window=self.window,
            policy=self.policy,
            expected_size=expected_size,
            max_size=max_size,
            cancelled=cancelled,
            progress=progress,
        )
        self._current = download
        try:
            return download.run()
        except TransferCancelled as exc:
            raise FetchCancelled(f"download of {sha[:12]} superseded") from exc
        except TransferError as exc:
            refusal = exc.__cause__
            revoked = isinstance(refusal, RemoteError) and refusal.code == ApiErrorCode.REVOKED
            raise FetchError(f"{sha[:12]}: {exc}", revoked=revoked) from exc
        finally:
            self._received_before += download.received
            self._current = None
