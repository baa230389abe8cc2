"""Downloads bundle files from the hub in chunks over MQTT (DESIGN.md, Rollout).

One file at a time, up to `window` FetchRequests in flight. Each reply's chunk is
checked against its `sha256` user property; chunks are appended to `{file}.part`
strictly in order (out-of-order replies wait in memory), so the part file's size is
always the last good offset, and a download interrupted by a disconnect or a node
restart resumes there. A request whose reply does not come within `timeout_s` is
sent again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho

from cellwatch.node.errors import NodeError
from cellwatch.shared.mqtt import MqttClient, PublishProps, user_properties
from cellwatch.shared.schemas import FetchRequest
from cellwatch.shared.topics import Topics

log = logging.getLogger(__name__)


class FetchError(NodeError):
    """The hub refused a request or kept not answering."""


class FetchCancelled(NodeError):
    """A newer desired model superseded this download."""


@dataclass
class _Reply:
    offset: int
    total: int
    data: bytes


class Fetcher:
    def __init__(
        self,
        mqtt: MqttClient,
        topics: Topics,
        node_id: str,
        *,
        window: int = 4,
        chunk_bytes: int = 256 * 1024,
        timeout_s: float = 10.0,
        max_attempts: int = 6,
    ) -> None:
        self.mqtt = mqtt
        self.topics = topics
        self.node_id = node_id
        self.window = window
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self._cond = threading.Condition()
        self._replies: dict[bytes, _Reply | FetchError] = {}
        self._wanted: set[bytes] = set()
        self.bytes_received = 0

    # -- network thread ---------------------------------------------------------
    def on_reply(self, msg: paho.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        key = bytes(corr or b"")
        with self._cond:
            if key not in self._wanted:
                return  # a late reply to a request we already re-sent or gave up on
        props = user_properties(msg)
        reply: _Reply | FetchError
        if "error" in props:
            reply = FetchError(f"hub refused: {props['error']}: {props.get('message', '')}")
        else:
            data = bytes(msg.payload)
            try:
                offset, total = int(props["offset"]), int(props["total"])
            except (KeyError, ValueError):
                return  # malformed: treat as lost; the request is re-sent on timeout
            if hashlib.sha256(data).hexdigest() != props.get("sha256"):
                log.warning(
                    "node %s: chunk at %d failed its SHA-256; refetching", self.node_id, offset
                )
                return
            reply = _Reply(offset, total, data)
        with self._cond:
            self._replies[key] = reply
            self._cond.notify_all()

    # -- agent thread -------------------------------------------------------------
    def _request(self, sha: str, name: str, offset: int, length: int) -> bytes:
        key = uuid.uuid4().bytes
        req = FetchRequest(
            node_id=self.node_id, manifest_sha256=sha, file=name, offset=offset, length=length
        )
        with self._cond:
            self._wanted.add(key)
        self.mqtt.publish(
            self.topics.hub_fetch(),
            req.to_json(),
            qos=1,
            props=PublishProps(
                response_topic=self.topics.fetch_reply(self.node_id), correlation_data=key
            ),
        )
        return key

    def fetch(
        self,
        sha: str,
        name: str,
        dest: Path,
        *,
        cancelled: Callable[[], bool] = lambda: False,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> int:
        """Download file `name` of bundle `sha` to dest (resuming dest.part); returns size."""
        part = dest.with_name(dest.name + ".part")
        done = part.stat().st_size if part.exists() else 0
        total: int | None = None
        pending: dict[int, tuple[bytes, float, int]] = {}  # offset -> (key, sent at, tries)
        ready: dict[int, bytes] = {}
        next_offset = done
        if done:
            log.info("node %s: resuming %s of %s at byte %d", self.node_id, name, sha[:12], done)
        with part.open("ab") as out:
            while total is None or done < total:
                if cancelled():
                    raise FetchCancelled(f"download of {sha[:12]} superseded")
                while len(pending) < self.window and (total is None or next_offset < total):
                    if total is None and pending:
                        break  # learn the size from the first reply before fanning out
                    key = self._request(sha, name, next_offset, self.chunk_bytes)
                    pending[next_offset] = (key, time.monotonic(), 1)
                    next_offset += self.chunk_bytes
                got = self._collect(pending, sha, name)
                for offset, reply in got.items():
                    if isinstance(reply, FetchError):
                        raise reply
                    total = reply.total
                    ready[offset] = reply.data
                    self.bytes_received += len(reply.data)
                if total is not None:
                    next_offset = min(next_offset, max(total, done))
                    for off in [o for o in pending if o >= total]:
                        self._forget(pending.pop(off)[0])
                while done in ready:
                    data = ready.pop(done)
                    if not data and done < (total or 0):
                        raise FetchError(f"hub sent an empty chunk at {done} of {name}")
                    out.write(data)
                    out.flush()
                    done += len(data)
                    progress(done, total or 0)
                    if not data:
                        break
                if total == 0:
                    break
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, dest)
        return done

    def _collect(
        self, pending: dict[int, tuple[bytes, float, int]], sha: str, name: str
    ) -> dict[int, _Reply | FetchError]:
        """Wait briefly for replies to pending requests; re-send timed-out ones."""
        got: dict[int, _Reply | FetchError] = {}
        with self._cond:
            self._cond.wait_for(
                lambda: any(k in self._replies for k, _, _ in pending.values()), timeout=0.5
            )
            for offset, (key, _, _) in list(pending.items()):
                if key in self._replies:
                    got[offset] = self._replies.pop(key)
                    self._wanted.discard(key)
                    del pending[offset]
        now = time.monotonic()
        for offset, (key, sent, tries) in list(pending.items()):
            if now - sent > self.timeout_s:
                self._forget(key)
                if tries >= self.max_attempts:
                    raise FetchError(
                        f"no reply from the hub for offset {offset} after {tries} attempts"
                    )
                log.warning("node %s: fetch at %d timed out; asking again", self.node_id, offset)
                pending[offset] = (
                    self._request(sha, name, offset, self.chunk_bytes),
                    now,
                    tries + 1,
                )
        return got

    def _forget(self, key: bytes) -> None:
        with self._cond:
            self._wanted.discard(key)
            self._replies.pop(key, None)
