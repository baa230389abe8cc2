"""The windowed chunk download (cellwatch.shared.rpc.transfer) against a scripted chunk
server on the real broker: the hub's protocol, with faults on cue."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cellwatch.shared.mqtt import Message, PublishProps
from cellwatch.shared.rpc import RequestPolicy, Rpc
from cellwatch.shared.rpc.transfer import Download, TransferCancelled, TransferError
from cellwatch.shared.schemas import FetchRequest
from tests.broker import Broker
from tests.harness import T

SHA = "ab" * 32
DATA = os.urandom(100_000)


@dataclass
class Server:
    """Serves DATA as the hub would (max_chunk bytes per answer), with faults."""

    data: bytes = DATA
    max_chunk: int = 4096
    corrupt_once_at: int | None = None
    silent: bool = False
    error: str | None = None
    asked: list[tuple[int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, msg: Message) -> tuple[bytes, PublishProps] | None:
        req = FetchRequest.model_validate_json(msg.payload)
        corr = msg.correlation
        with self.lock:
            self.asked.append((req.offset, req.length))
        if self.silent:
            return None
        if self.error is not None:
            return b"", PublishProps(
                correlation_data=corr, user=(("error", self.error), ("message", "no"))
            )
        data = self.data[req.offset : req.offset + min(req.length, self.max_chunk)]
        sha = hashlib.sha256(data).hexdigest()
        if req.offset == self.corrupt_once_at:
            self.corrupt_once_at = None
            sha = "0" * 64
        user = (("offset", str(req.offset)), ("total", str(len(self.data))), ("sha256", sha))
        return data, PublishProps(correlation_data=corr, user=user)


@pytest.fixture
def server(broker: Broker) -> Iterator[Server]:
    srv = Server()

    def on_request(msg: Message) -> None:
        out = srv.answer(msg)
        if out is not None:
            hub.publish(T.fetch_reply("node-1"), out[0], qos=1, props=out[1])

    hub = broker.connect("hub", subscriptions=[(T.hub_fetch_filter(), 1)], handler=on_request)
    yield srv


@pytest.fixture
def download(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., Download]]:
    mqtt = broker.connect("node-1", subscriptions=[(T.fetch_reply("node-1"), 1)])
    rpc = Rpc(mqtt, T.fetch_reply("node-1"), window=4, name="dl").attach()

    def make(**kwargs: object) -> Download:
        def request_for(offset: int, length: int) -> tuple[str, bytes]:
            req = FetchRequest(manifest_sha256=SHA, file="model.bin", offset=offset, length=length)
            return T.hub_fetch("node-1"), req.to_json()

        values: dict[str, object] = {
            "rpc": rpc,
            "request_for": request_for,
            "dest": tmp_path / "model.bin",
            "chunk_bytes": 16384,
            "window": 4,
            "policy": RequestPolicy(timeout_s=20.0, retry_after_s=0.5, max_attempts=40),
        }
        values.update(kwargs)
        return Download(**values)  # type: ignore[arg-type]

    yield make
    rpc.close()


def test_advances_by_what_arrived_and_learns_the_servers_chunk_size(
    server: Server, download: Callable[..., Download], tmp_path: Path
) -> None:
    d = download()  # asks for 16 KiB, the server sends 4 KiB
    assert d.run() == len(DATA)
    assert (tmp_path / "model.bin").read_bytes() == DATA
    assert d.received == len(DATA)  # every byte once
    assert not (tmp_path / "model.bin.part").exists()
    lengths = {length for _, length in server.asked[4:]}
    assert lengths <= {4096, len(DATA) % 4096}  # after the first answers: the server's size


def test_the_size_must_match_the_manifest(
    server: Server, download: Callable[..., Download]
) -> None:
    with pytest.raises(TransferError, match=f"says {len(DATA)} bytes, expected 5000"):
        download(expected_size=5000).run()
    with pytest.raises(TransferError, match="over 1000"):
        download(max_size=1000).run()


def test_resumes_from_the_part_file_and_refetches_a_corrupt_chunk(
    server: Server, download: Callable[..., Download], tmp_path: Path
) -> None:
    (tmp_path / "model.bin.part").write_bytes(DATA[:40_000])
    server.corrupt_once_at = 40_000 + 4096
    d = download(expected_size=len(DATA))
    assert d.run() == len(DATA)
    assert (tmp_path / "model.bin").read_bytes() == DATA
    assert min(offset for offset, _ in server.asked) == 40_000  # nothing before the part
    assert [o for o, _ in server.asked].count(40_000 + 4096) == 2  # asked again
    assert d.rpc.stats().malformed == 1


def test_a_part_file_longer_than_the_file_starts_again(
    server: Server, download: Callable[..., Download], tmp_path: Path
) -> None:
    (tmp_path / "model.bin.part").write_bytes(b"x" * (len(DATA) + 1))
    assert download(expected_size=len(DATA)).run() == len(DATA)
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_an_error_answer_or_no_progress_fails(
    server: Server, download: Callable[..., Download], tmp_path: Path
) -> None:
    server.error = "unknown_file"
    with pytest.raises(TransferError, match="refused: unknown_file"):
        download().run()
    server.error = None
    server.silent = True
    stall = RequestPolicy(timeout_s=1.0, retry_after_s=0.3, max_attempts=3)
    with pytest.raises(TransferError, match="no answer within 1 s"):
        download(policy=stall).run()
    assert len(server.asked) >= 2  # asked again before giving up


def test_cancel_stops_and_frees_the_window(
    server: Server, download: Callable[..., Download]
) -> None:
    server.silent = True
    d = download(cancelled=lambda: bool(server.asked))  # cancelled once a request is out
    with pytest.raises(TransferCancelled):
        d.run()
    assert server.asked and d.rpc.stats().in_flight == 0


def test_empty_file(server: Server, download: Callable[..., Download], tmp_path: Path) -> None:
    server.data = b""
    assert download().run() == 0
    assert (tmp_path / "model.bin").read_bytes() == b""
    assert json.dumps(server.asked) == "[[0, 16384]]"
