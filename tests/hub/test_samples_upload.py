"""Field samples from a node process to a hub process (issue 20) over the project's
broker and ACL: resumed after a kill -9 mid-upload with no sample twice, one sample for
the same image twice, nothing acknowledged lost over a hub restart, and only the hub
may read the upload topics."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from cellwatch.hub.db import Database
from cellwatch.node.config import SamplesSettings
from cellwatch.node.decode import ImageLimits
from cellwatch.node.samples import DAY_S, SampleKeeper, encode_png
from cellwatch.node.sampleupload import SampleUploader
from cellwatch.node.spool import Spool
from cellwatch.shared.mqtt import Message, MqttClient
from cellwatch.shared.samples import SampleReason, SampleRow, sample_id
from tests.broker import Broker
from tests.harness import Requester, T, wait_for
from tests.hub.conftest import HubFactory
from tests.images import encode
from tests.security.stack import Boots, Stack


def noise_png(seed: int, side: int = 160) -> bytes:
    """An image PNG cannot compress: its sample is about side*side*3 bytes."""
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), ".png")


def samples_section(bytes_per_s: int, spool: Path) -> str:
    return (
        '[samples]\nenabled = true\nsources = ["client"]\nrandom_share = 1.0\n'
        f'spool_dir = "{spool}"\nupload_bytes_per_s = {bytes_per_s}\nchunk_bytes = 4096\n'
        "retry_s = 0.5\nchunk_timeout_s = 5.0\n"
    )


def hub_samples(data: Path) -> list[str]:
    db = Database(data / "hub.db", readonly=True)
    try:
        return [r.id for r in db.samples()]
    finally:
        db.close()


def stored_files(data: Path) -> list[str]:
    return sorted(p.stem for p in (data / "samples").glob("*.png"))


def spooled(spool: Path) -> list[str]:
    return sorted(p.stem for p in spool.glob("*.json"))


def test_a_node_killed_mid_upload_resumes_and_the_hub_has_each_sample_once(
    stack: Stack, broker: Broker, requester: Requester, tmp_path: Path
) -> None:
    data, spool = tmp_path / "hub-data", tmp_path / "spool"
    hub = stack.hub(data)
    hub.start()
    boots = Boots(broker, "node-1")
    slow = stack.node("node-1", extra=samples_section(4096, spool))  # a chunk a second
    slow.start()
    boots.wait_online(1)
    payload = noise_png(1)
    assert requester.result(requester.send(payload), 60).status == "ok"
    wait_for(lambda: len(spooled(spool)) == 1, 60, "the sample spooled")
    (sample,) = spooled(spool)
    part = data / "samples" / "uploads" / f"{sample}.png.part"
    wait_for(lambda: part.exists() and part.stat().st_size >= 4096, 60, "an upload under way")
    slow.kill()  # kill -9 mid-upload
    assert hub_samples(data) == []
    had = part.stat().st_size
    assert 0 < had < (spool / f"{sample}.png").stat().st_size

    fast = stack.node("node-1", extra=samples_section(10_000_000, spool))
    fast.start()
    wait_for(lambda: hub_samples(data) == [sample], 60, "the sample stored")
    wait_for(lambda: spooled(spool) == [], 60, "the node's copy deleted")
    assert re.search(rf"resuming {sample[:12]} at byte {had}\b", fast.text()), fast.text()
    assert stored_files(data) == [sample]
    assert sample_id((data / "samples" / f"{sample}.png").read_bytes()) == sample
    assert not part.exists()

    # the same image again: the same sample id, stored once
    assert requester.result(requester.send(payload), 60).status == "ok"
    wait_for(lambda: fast.text().count(f"{sample[:12]} uploaded") == 2, 60, "sent again")
    assert spooled(spool) == []
    assert hub_samples(data) == [sample] and stored_files(data) == [sample]

    # a hub restart: what it acknowledged is there; what comes meanwhile waits
    hub.kill()
    other = noise_png(2)
    assert requester.result(requester.send(other), 60).status == "ok"
    wait_for(lambda: len(spooled(spool)) == 1, 60, "spooled while the hub is down")
    hub = stack.hub(data)
    hub.start()
    wait_for(lambda: len(hub_samples(data)) == 2, 60, "uploaded once the hub is back")
    assert set(hub_samples(data)) == {sample, spooled_id(other)}
    wait_for(lambda: spooled(spool) == [], 60, "the node's copy deleted")
    boots.close()


def spooled_id(payload: bytes) -> str:
    """The sample id of a PNG payload the node re-encodes (same pixels, the node's PNG)."""
    import cv2

    from cellwatch.node.samples import encode_png

    bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    return sample_id(encode_png(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))


def test_only_the_hub_reads_the_sample_topics(broker: Broker) -> None:
    """The operator, a lab and another node subscribe to the upload topics and the
    hub's answers: the broker's ACL gives them nothing; node-1 cannot write as node-2."""
    seen: dict[str, list[Message]] = {u: [] for u in ("hub", "operator", "client", "node-2")}
    filters = [("cellwatch/hub/samples/#", 1), ("cellwatch/nodes/+/samples", 1)]
    for user, got in seen.items():
        broker.connect(user, subscriptions=filters, handler=got.append)
    node = broker.connect("node-1")
    node.publish_wait("cellwatch/hub/samples/node-2/offer", b"{}", qos=1)
    node.publish_wait("cellwatch/hub/samples/node-1/offer", b"{}", qos=1)
    node.publish_wait("cellwatch/nodes/node-1/samples", b"{}", qos=1)  # not the node's to write
    marker = "cellwatch/hub/samples/node-1/chunk"
    assert node.publish_wait(marker, b"x", qos=1)
    wait_for(lambda: any(m.topic == marker for m in seen["hub"]), 30, "the hub reads the marker")
    assert [m.topic for m in seen["hub"]] == ["cellwatch/hub/samples/node-1/offer", marker]
    assert all(seen[u] == [] for u in ("operator", "client", "node-2"))


@contextmanager
def uploader(
    broker: Broker, tmp_path: Path, backlog: Callable[[], int]
) -> Iterator[tuple[SampleKeeper, SampleRow]]:
    """A node's sample uploader on its own MQTT connection as node-1, running, with one
    sample spooled."""
    settings = SamplesSettings(enabled=True, sources=["client"], retry_s=0.2)
    spool = Spool(tmp_path / "spool", 10**9, DAY_S, "node-1")
    keeper = SampleKeeper(settings, node_id="node-1", spool=spool, limits=ImageLimits())
    keeper.start()
    data = encode_png(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    row = SampleRow(
        id=sample_id(data),
        source="client",
        node="node-1",
        model="toy@1.0.0",
        p_all=0.5,
        predicted="ALL",
        reason=SampleReason.RANDOM,
        collected_at=datetime.now(UTC),
    )
    assert spool.put(data, row)
    mqtt = MqttClient(
        broker.settings("node-1"),
        client_id="uploader-test",
        clean_start=True,
        subscriptions=[(T.samples_reply("node-1"), 1)],
    )
    stop = threading.Event()
    up = SampleUploader(
        settings, mqtt=mqtt, topics=T, node_id="node-1", keeper=keeper, backlog=backlog, stop=stop
    )
    up.rpc.attach()
    mqtt.connect()
    thread = threading.Thread(target=up.run)
    thread.start()
    try:
        yield keeper, row
    finally:
        stop.set()
        keeper.written.set()
        thread.join()
        up.close()
        mqtt.disconnect()


def test_no_sample_is_uploaded_while_live_images_wait(
    hub_factory: HubFactory, broker: Broker, tmp_path: Path
) -> None:
    """While the node has images without their Result, the sample stays on the node."""
    hub = hub_factory()
    waiting, polls = [2], [0]

    def backlog() -> int:
        polls[0] += 1
        return waiting[0]

    with uploader(broker, tmp_path, backlog) as (keeper, row):
        wait_for(lambda: polls[0] >= 5, 30, "the uploader looked at the backlog 5 times")
        assert not hub.db.has_sample(row.id)
        assert [s.row.id for s in keeper.spool.pending()] == [row.id]
        waiting[0] = 0  # the live images were answered
        wait_for(lambda: hub.db.has_sample(row.id), 30, "uploaded once no image waits")
        wait_for(lambda: keeper.spool.pending() == [], 30, "the node's copy deleted")
        assert keeper.figures().uploaded == 1


def test_the_hubs_quota_refuses_a_sample_and_the_node_keeps_it(
    hub_factory: HubFactory, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub = hub_factory(samples={"quota_mb": 0.001})  # 1 KiB: less than the sample
    with uploader(broker, tmp_path, lambda: 0) as (keeper, row):

        def refusals() -> int:
            return sum(
                "quota" in r.getMessage()
                for r in caplog.records
                if r.name == "cellwatch.node.sampleupload"
            )

        wait_for(lambda: refusals() >= 2, 30, "the offer refused, and again after retry_s")
        assert not hub.db.has_sample(row.id)
        assert [s.row.id for s in keeper.spool.pending()] == [row.id]
        assert keeper.figures().uploaded == 0
    assert list((hub.settings.samples_dir / "uploads").iterdir()) == []
