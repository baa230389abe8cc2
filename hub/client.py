"""The operator's side of the hub API (what `cellwatch-hub` commands call).

`HubClient` connects as the operator, sends ApiRequests on
`cellwatch/hub/api/{verb}` with a Response Topic under
`cellwatch/hub/replies/{user}/` and Correlation Data (through the shared
request/response layer, `cellwatch.shared.rpc`), and waits for the ApiReply.
A request the broker refuses (the ACL: only the operator may call the hub) raises
HubRefused; no answer raises HubUnavailable; an error reply raises ApiFailure.
"""

from __future__ import annotations

import base64
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cellwatch.hub.errors import ApiFailure, HubError, HubRefused, HubUnavailable
from cellwatch.shared.bundle import check_file_name, parse_manifest, unpack_tar, verify_file
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.errors import BundleError
from cellwatch.shared.hubapi import (
    MAX_LABELS_PER_CALL,
    UPLOAD_VERB,
    ModelsArgs,
    ModelsReply,
    NodesReply,
    PushBeginArgs,
    PushBeginReply,
    PushCommitArgs,
    PushCommitReply,
    RevokeArgs,
    RevokeReply,
    RolloutIdArgs,
    RolloutInfo,
    RolloutList,
    RolloutStartArgs,
    RolloutStatusArgs,
    SampleImageArgs,
    SampleImageReply,
    SampleLabelArgs,
    SampleLabelReply,
    SamplesArgs,
    SamplesReply,
    StatsReply,
    UploadAck,
)
from cellwatch.shared.manifest import MANIFEST_FILE, SIGNATURE_FILE
from cellwatch.shared.mqtt import Message, MqttClient
from cellwatch.shared.revocations import sign_revocation
from cellwatch.shared.rpc import (
    PublishRefused,
    RemoteError,
    Reply,
    RequestPolicy,
    RequestTimeout,
    Rpc,
    RpcError,
)
from cellwatch.shared.rpc.transfer import Upload
from cellwatch.shared.schemas import ApiReply, ApiRequest, ModelRef
from cellwatch.shared.settings import MqttSettings
from cellwatch.shared.signing import load_private_key
from cellwatch.shared.topics import Topics

UPLOAD_CHUNK_BYTES = 1024 * 1024
UPLOAD_WINDOW = 4
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PushResult:
    status: str
    """`stored` or `already_present`."""
    model: dict[str, Any]
    bytes_sent: int


def _parse_reply(msg: Message) -> ApiReply:
    try:
        return ApiReply.model_validate_json(msg.payload)
    except ValidationError as exc:
        raise RemoteError("internal", "the hub sent a malformed reply") from exc


def _api_code(value: str) -> ApiErrorCode:
    """An error code from the hub; one this client does not know is `internal` (the
    message still says what happened)."""
    try:
        return ApiErrorCode(value)
    except ValueError:
        return ApiErrorCode.INTERNAL


class HubClient:
    def __init__(self, settings: MqttSettings, *, timeout_s: float = 10.0) -> None:
        if settings.username is None:
            settings = settings.model_copy(update={"username": "operator"})
        self.settings = settings
        self.username = settings.username or "operator"
        self.timeout_s = timeout_s
        self.policy = RequestPolicy(timeout_s=timeout_s)
        """One attempt each: an upload chunk must not arrive twice, and the hub's
        persistent session keeps a request while it restarts."""
        self.topics = Topics(settings.topic_prefix)
        token = uuid.uuid4().hex[:12]
        self.reply_topic = self.topics.hub_replies(self.username, f"cli-{token}")
        # Random and unrelated to the reply topic: no other account can guess it and
        # take the session over (Mosquitto lets any account use any client id).
        self.mqtt = MqttClient(
            settings.model_copy(update={"session_expiry_s": 0}),
            client_id=f"cellwatch-cli-{uuid.uuid4().hex}",
            clean_start=True,
            subscriptions=[(self.reply_topic, 1)],
        )
        self.rpc = Rpc(self.mqtt, self.reply_topic, window=64, name="hub-client").attach()

    def __enter__(self) -> HubClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        self.mqtt.connect()

    def close(self) -> None:
        self.mqtt.disconnect()
        self.rpc.close()

    # -- transport ---------------------------------------------------------------------
    def send(
        self, verb: str, payload: bytes, user: tuple[tuple[str, str], ...] = ()
    ) -> Future[Reply[ApiReply]]:
        """Publish raw bytes on `hub/api/{verb}`; the future gets the ApiReply."""
        return self.rpc.submit(
            self.topics.hub_api(verb), payload, _parse_reply, self.policy, user=user
        )

    def wait(self, future: Future[Reply[ApiReply]], what: str) -> Any:
        """The reply's data; HubUnavailable, HubRefused or ApiFailure otherwise."""
        try:
            reply = future.result().value
        except RequestTimeout as exc:
            s = self.settings
            raise HubUnavailable(
                f"no answer from the hub within {self.timeout_s:g} s to {what} "
                f"(is `cellwatch-hub serve` running and connected to {s.host}:{s.port}?)"
            ) from exc
        except PublishRefused as exc:
            raise HubRefused(
                f"the broker refused {what} from user {self.username!r}: only the "
                "operator may call the hub API (check --user and the ACL)"
            ) from exc
        except RemoteError as exc:
            raise ApiFailure(_api_code(exc.code), exc.message) from exc
        except RpcError as exc:
            raise HubError(f"{what}: {exc}") from exc
        if not reply.ok:
            err = reply.error
            if err is None:
                raise ApiFailure(ApiErrorCode.INTERNAL, "the hub refused without saying why")
            raise ApiFailure(err.code, err.message)
        return reply.data

    def raw(self, verb: str, payload: bytes) -> ApiReply:
        """Send raw bytes and return the ApiReply, error or not (protocol tests)."""
        try:
            return self.send(verb, payload).result().value
        except RequestTimeout as exc:
            raise HubUnavailable(f"no answer from the hub to {verb}") from exc

    def call(
        self, verb: str, args: BaseModel | None = None, *, request_id: str | None = None
    ) -> Any:
        """Send one request and return the reply's data (see the module docstring)."""
        req = ApiRequest(
            request_id=request_id or uuid.uuid4().hex,
            args=args.model_dump(mode="json", exclude_none=True) if args is not None else {},
        )
        return self.wait(self.send(verb, req.to_json()), verb)

    # -- verbs ---------------------------------------------------------------------------
    def models(self, name: str | None = None) -> ModelsReply:
        return ModelsReply.model_validate(self.call("models", ModelsArgs(name=name)))

    def revoke(
        self,
        name: str,
        version: str,
        reason: str,
        sign_key: Path,
        *,
        request_id: str | None = None,
    ) -> RevokeReply:
        """Revoke NAME VERSION: the revocation names the bundle the hub stores under
        that name and version, signed here with the release key at sign_key (the hub
        and nodes take only revocations a key they trust signed). SignatureError if the
        key cannot be read; ApiFailure (not_found) if the hub has no such model."""
        key = load_private_key(sign_key)
        found = [m for m in self.models(name).models if m.version == version]
        if not found:
            raise ApiFailure(ApiErrorCode.NOT_FOUND, f"no model {name} {version} on the hub")
        m = found[0]
        ref = ModelRef(name=m.name, version=m.version, manifest_sha256=m.manifest_sha256)
        args = RevokeArgs(revocation=sign_revocation(key, ref, reason))
        return RevokeReply.model_validate(self.call("models.revoke", args, request_id=request_id))

    def nodes(self) -> NodesReply:
        return NodesReply.model_validate(self.call("nodes"))

    def stats(self) -> StatsReply:
        return StatsReply.model_validate(self.call("stats"))

    def rollout_start(self, args: RolloutStartArgs, request_id: str | None = None) -> RolloutInfo:
        return RolloutInfo.model_validate(self.call("rollout.start", args, request_id=request_id))

    def rollout_status(self, rollout_id: str | None = None) -> RolloutInfo:
        return RolloutInfo.model_validate(
            self.call("rollout.status", RolloutStatusArgs(rollout_id=rollout_id))
        )

    def samples(self, reason: str | None = None, source: str | None = None) -> SamplesReply:
        args = SamplesArgs.model_validate({"reason": reason, "source": source})
        return SamplesReply.model_validate(self.call("samples", args))

    def sample_image(self, sample: str) -> bytes:
        """A sample's PNG, a part per request."""
        data = b""
        while True:
            part = SampleImageReply.model_validate(
                self.call("samples.image", SampleImageArgs(id=sample, offset=len(data)))
            )
            chunk = base64.b64decode(part.data)
            data += chunk
            if len(data) >= part.total or not chunk:
                return data

    def sample_labels(self, labels: dict[str, str]) -> SampleLabelReply:
        """Record labels, MAX_LABELS_PER_CALL a call (each call all or nothing)."""
        items, done = list(labels.items()), 0
        for i in range(0, len(items), MAX_LABELS_PER_CALL):
            batch = dict(items[i : i + MAX_LABELS_PER_CALL])
            reply = SampleLabelReply.model_validate(
                self.call("samples.label", SampleLabelArgs(labels=batch))
            )
            done += reply.labelled
        return SampleLabelReply(labelled=done)

    def rollout_list(self) -> RolloutList:
        return RolloutList.model_validate(self.call("rollout.list"))

    def rollout_verb(self, verb: str, rollout_id: str) -> RolloutInfo:
        """verb: pause, resume, promote, abort or rollback."""
        return RolloutInfo.model_validate(
            self.call(f"rollout.{verb}", RolloutIdArgs(rollout_id=rollout_id))
        )

    # -- push ------------------------------------------------------------------------------
    def push(self, bundle: Path, progress: Progress | None = None) -> PushResult:
        """Upload a bundle directory or .tar; the hub verifies it before storing it."""
        if bundle.is_file():
            with tempfile.TemporaryDirectory(prefix="cellwatch-push-") as tmp:
                return self._push_dir(unpack_tar(bundle, Path(tmp) / "bundle"), progress)
        return self._push_dir(bundle, progress)

    def _push_dir(self, bundle: Path, progress: Progress | None) -> PushResult:
        files = check_bundle_dir(bundle)
        sig = bundle / SIGNATURE_FILE
        begin = PushBeginReply.model_validate(
            self.call(
                "push.begin",
                PushBeginArgs(
                    manifest=_b64(bundle / MANIFEST_FILE),
                    signature=_b64(sig) if sig.is_file() else None,
                ),
            )
        )
        if begin.status == "already_present":
            assert begin.model is not None
            return PushResult("already_present", begin.model.model_dump(mode="json"), 0)
        assert begin.upload_id is not None
        chunk = min(UPLOAD_CHUNK_BYTES, begin.chunk_bytes or UPLOAD_CHUNK_BYTES)
        total = sum(f.size for f in begin.files.values())
        done = sum(f.offset for f in begin.files.values())
        sent = 0
        for name, f in begin.files.items():
            if name not in files:
                raise HubError(f"the hub asks for {name}, which {bundle} does not have")
            sent += self._upload_file(
                begin.upload_id, bundle / name, f.offset, f.size, chunk, done, total, progress
            )
            done += f.size - f.offset
        commit = PushCommitReply.model_validate(
            self.call("push.commit", PushCommitArgs(upload_id=begin.upload_id))
        )
        return PushResult(commit.status, commit.model.model_dump(mode="json"), sent)

    def _upload_file(
        self,
        upload_id: str,
        path: Path,
        offset: int,
        size: int,
        chunk: int,
        done: int,
        total: int,
        progress: Progress | None,
    ) -> int:
        """Send path from offset through the one chunk transfer (shared.rpc.transfer),
        UPLOAD_WINDOW chunks in flight; the hub acknowledges each in order."""

        def confirm(future: Future[Reply[ApiReply]]) -> None:
            UploadAck.model_validate(self.wait(future, f"upload of {path.name}"))

        upload = Upload(
            rpc=self.rpc,
            topic=self.topics.hub_api(UPLOAD_VERB),
            naming=(("upload_id", upload_id), ("file", path.name)),
            path=path,
            start=offset,
            size=size,
            chunk_bytes=chunk,
            window=UPLOAD_WINDOW,
            parse=_parse_reply,
            policy=self.policy,
            confirm=confirm,
            progress=(lambda sent: progress(done + sent, total)) if progress else lambda sent: None,
        )
        return upload.run()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def check_bundle_dir(bundle: Path) -> set[str]:
    """The operator-side check before uploading: only bundle file names, a valid
    manifest, every file's size and SHA-256 (the signature is the hub's to judge)."""
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a bundle directory or .tar")
    names = set()
    for entry in bundle.iterdir():
        check_file_name(entry.name)
        if not entry.is_file() or entry.is_symlink():
            raise BundleError(f"bundle entry {entry.name} is not a regular file")
        names.add(entry.name)
    if MANIFEST_FILE not in names:
        raise BundleError(f"{bundle} has no {MANIFEST_FILE}")
    manifest = parse_manifest((bundle / MANIFEST_FILE).read_bytes())
    for name, file_entry in manifest.files.items():
        verify_file(bundle / name, file_entry)
    return names
