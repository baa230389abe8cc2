"""Scripted nodes for hub tests: real MQTT peers (node users, real broker) that speak
the node's side of the protocol: retained status with a Will, UpdateReports, and
downloads with the node's own Fetcher. They stand in for the node's update agent
where a test needs exact control (fail on cue, stay silent, count bytes); the
end-to-end tests use real nodes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from cellwatch.node.fetcher import Fetcher, FetchError
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.mqtt import Message, MqttClient, Will
from cellwatch.shared.rpc import RequestPolicy, RequestTimeout
from cellwatch.shared.schemas import (
    DesiredModel,
    FetchRequest,
    ModelRef,
    NodeStatus,
    UpdateError,
    UpdateReport,
    utcnow,
)
from cellwatch.shared.settings import MqttSettings
from cellwatch.shared.states import NodeState, UpdateState
from cellwatch.shared.topics import Topics

T = Topics()


@dataclass
class Reply:
    payload: bytes
    props: dict[str, str]


class FetchFailed(Exception):
    pass


def raw_reply(msg: Message) -> Reply:
    return Reply(msg.payload, dict(msg.user))


class FakeNode:
    """behaviour: `update` (download and report up to active), `fail` (report failed
    with fail_code), `silent` (never answer), `manual` (the test reports).

    Downloads use the node's own Fetcher (cellwatch.node.fetcher); `request` and
    `fetch` send single protocol-level requests through the same request layer."""

    def __init__(
        self,
        settings: MqttSettings,
        node_id: str,
        *,
        model: ModelRef | None = None,
        tags: tuple[str, ...] = (),
        behaviour: str = "update",
        fail_code: UpdateErrorCode = UpdateErrorCode.SELF_TEST_FAILED,
        chunk_bytes: int = 64 * 1024,
        connect: bool = True,
    ) -> None:
        self.node_id = node_id
        self.model = model
        self.tags = list(tags)
        self.behaviour = behaviour
        self.fail_code = fail_code
        self.chunk_bytes = chunk_bytes
        self.boot_id = uuid.uuid4().hex
        self.since = utcnow()
        self.have: set[str] = set()
        """Bundles (manifest sha256) this node holds: switching to them needs no download."""
        self.desired: list[DesiredModel] = []
        self._cond = threading.Condition()
        self._work: list[DesiredModel] = []
        self._stop = False
        self._scratch = Path(tempfile.mkdtemp(prefix=f"fake-{node_id}-"))
        self.mqtt = MqttClient(
            settings,
            client_id=f"fake-{node_id}-{self.boot_id[:6]}",
            clean_start=True,
            will=Will(T.status(node_id), self.status(NodeState.OFFLINE).to_json()),
            subscriptions=[(T.desired(node_id), 1), (T.fetch_reply(node_id), 1)],
        )
        self.fetcher = Fetcher(
            self.mqtt, T, node_id, chunk_bytes=chunk_bytes, timeout_s=5.0, stall_timeout_s=30.0
        )
        self.mqtt.set_message_handler(self._on_message)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if connect:
            self.connect()

    @property
    def bytes_fetched(self) -> int:
        return self.fetcher.bytes_received

    # -- connection and status ---------------------------------------------------------
    def connect(self) -> None:
        self.mqtt.connect()
        self.publish_status()

    def status(self, state: NodeState = NodeState.ONLINE) -> NodeStatus:
        return NodeStatus(
            node_id=self.node_id,
            state=state,
            boot_id=self.boot_id,
            since=self.since,
            model=self.model,
            tags=self.tags,
            device="CPU",
        )

    def publish_status(self, state: NodeState = NodeState.ONLINE) -> None:
        ok = self.mqtt.publish_wait(
            T.status(self.node_id), self.status(state).to_json(), qos=1, retain=True
        )
        assert ok, "broker refused the status"

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.mqtt.connected:
            self.mqtt.disconnect()
        self.fetcher.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def crash(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the Will."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.mqtt.drop()
        self.fetcher.close()

    # -- messages ------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        if msg.topic == T.desired(self.node_id):
            if not msg.payload:
                return
            d = DesiredModel.model_validate_json(msg.payload)
            with self._cond:
                self.desired.append(d)
                self._work.append(d)
                self._cond.notify_all()
            return
        self.fetcher.rpc.on_message(msg)

    def report(
        self,
        d: DesiredModel,
        state: UpdateState,
        progress: float = 0.0,
        error: UpdateError | None = None,
    ) -> None:
        r = UpdateReport(
            rollout_id=d.rollout_id,
            model=d.model,
            state=state,
            progress=progress,
            error=error,
            ts=utcnow(),
        )
        assert self.mqtt.publish_wait(T.update(self.node_id), r.to_json(), qos=1)

    # -- fetching --------------------------------------------------------------------------
    def request(
        self,
        payload: bytes,
        *,
        topic: str | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        timeout: float = 10.0,
    ) -> Reply | None:
        """Publish raw bytes on this node's fetch request topic (or `topic`); the reply,
        or None if none came. PublishRefused if the broker refuses the publish."""
        sent = self.fetcher.rpc.submit(
            topic or T.hub_fetch(self.node_id),
            payload,
            raw_reply,
            RequestPolicy(timeout_s=timeout),
            response_topic=response_topic,
            correlation=correlation,
        )
        try:
            return sent.result().value
        except RequestTimeout:
            return None

    def fetch(self, sha: str, name: str, offset: int = 0, length: int | None = None) -> Reply:
        """One chunk request."""
        req = FetchRequest(
            manifest_sha256=sha, file=name, offset=offset, length=length or self.chunk_bytes
        )
        reply = self.request(req.to_json())
        if reply is None:
            raise FetchFailed(f"no reply for {name} at {offset}")
        return reply

    def download_file(
        self, sha: str, name: str, *, part: bytes = b"", expected_size: int | None = None
    ) -> bytes:
        """The node's Fetcher downloads name, resuming after `part` (the bytes a
        previous attempt left in the .part file)."""
        dest = self._scratch / sha / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        dest.with_name(name + ".part").write_bytes(part)
        try:
            self.fetcher.fetch(sha, name, dest, expected_size=expected_size)
        except FetchError as exc:
            raise FetchFailed(str(exc)) from exc
        return dest.read_bytes()

    def download(self, sha: str) -> dict[str, bytes]:
        files = {MANIFEST_FILE: self.download_file(sha, MANIFEST_FILE)}
        files[SIGNATURE_FILE] = self.download_file(sha, SIGNATURE_FILE)
        manifest = json.loads(files[MANIFEST_FILE])
        for name, entry in manifest["files"].items():
            files[name] = self.download_file(sha, name, expected_size=entry["size"])
            assert hashlib.sha256(files[name]).hexdigest() == entry["sha256"]
        return files

    # -- the scripted agent ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or bool(self._work))
                if self._stop:
                    return
                d = self._work.pop(0)
            try:
                self._reconcile(d)
            except Exception as exc:  # a test helper: surface it in the reports
                self.report(
                    d,
                    UpdateState.FAILED,
                    0.0,
                    UpdateError(code=UpdateErrorCode.INTERNAL, message=str(exc)),
                )

    def _reconcile(self, d: DesiredModel) -> None:
        if self.behaviour in ("silent", "manual"):
            return
        sha = d.model.manifest_sha256
        if self.model is not None and self.model.manifest_sha256 == sha:
            self.report(d, UpdateState.ACTIVE, 1.0)
            return
        self.report(d, UpdateState.PENDING)
        if self.behaviour == "fail":
            self.report(d, UpdateState.FAILED, error=UpdateError(code=self.fail_code, message="x"))
            return
        if sha not in self.have:
            self.report(d, UpdateState.DOWNLOADING)
            self.download(sha)
            self.have.add(sha)
        self.report(d, UpdateState.VERIFYING, 1.0)
        self.report(d, UpdateState.ACTIVATING, 1.0)
        if self.model is not None:
            self.have.add(self.model.manifest_sha256)
        self.model = ModelRef(name=d.model.name, version=d.model.version, manifest_sha256=sha)
        self.publish_status()
        self.report(d, UpdateState.ACTIVE, 1.0)
