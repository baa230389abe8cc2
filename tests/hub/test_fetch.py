"""The chunk server, driven by a scripted node over the real broker."""

from __future__ import annotations

import hashlib

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.fetch import by_node
from cellwatch.hub.service import HubService
from cellwatch.shared.rpc import PublishRefused
from cellwatch.shared.schemas import FetchRequest
from tests.broker import Broker
from tests.harness import Collector, T
from tests.hub.conftest import Bundles, HubFactory, NodeMaker
from tests.hub.scripted_nodes import Reply


def test_whole_bundle_in_chunks_and_counted(
    hub_factory: HubFactory, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    hub_factory(max_chunk_bytes=100_000)
    operator.push(bundles.v1)
    sha = bundles.sha(bundles.v1)
    node = fake_nodes("node-1", chunk_bytes=4_000_000)  # asks for more than the hub sends
    files = node.download(sha)
    for name, data in files.items():
        assert data == (bundles.v1 / name).read_bytes(), name
    golden = (bundles.v1 / "golden.npz").stat().st_size
    assert golden > 300_000  # so it really took several clamped chunks
    first = node.fetch(sha, "golden.npz", 0)
    assert len(first.payload) == 100_000 and first.props["total"] == str(golden)
    total = sum(len(d) for d in files.values()) + 100_000
    stats = operator.stats()
    assert stats.bytes_by_node_bundle == {"node-1": {sha: total}}
    assert stats.bytes_by_bundle == {sha: total}
    assert {n.node_id: n.bytes_served for n in operator.nodes().nodes} == {"node-1": total}


def test_resume_at_an_offset_and_the_end(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    operator.push(bundles.v1)
    sha = bundles.sha(bundles.v1)
    node = fake_nodes("node-1")
    data = (bundles.v1 / "model.bin").read_bytes()
    half = len(data) // 2
    whole = node.download_file(sha, "model.bin", part=data[:half], expected_size=len(data))
    assert whole == data
    assert node.bytes_fetched == len(data) - half  # resumed, not started again
    end = node.fetch(sha, "model.bin", len(data))
    assert end.payload == b"" and end.props["total"] == str(len(data))
    assert end.props["sha256"] == hashlib.sha256(b"").hexdigest()


def _error(reply: Reply | None) -> str:
    assert reply is not None, "no reply"
    assert reply.payload == b"", reply.props
    return reply.props["error"]


def test_bad_requests_get_error_replies_and_the_hub_keeps_serving(
    broker: Broker, hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    operator.push(bundles.v1)
    sha = bundles.sha(bundles.v1)
    node = fake_nodes("node-1")
    size = (bundles.v1 / "model.xml").stat().st_size

    assert _error(node.fetch(sha, "model.xml", size + 1)) == "bad_offset"
    assert _error(node.fetch("f" * 64, "model.xml")) == "unknown_bundle"
    for name in ("../../hub.db", "model.xml/../model.bin", "evil.sh", "hub.db"):
        assert _error(node.fetch(sha, name)) == "unknown_file", name
    assert _error(node.request(b"{not json")) == "bad_request"
    assert _error(node.request(b"[]")) == "bad_request"
    assert _error(node.request(b'{"node_id": "node-1"}')) == "bad_request"
    negative = FetchRequest(manifest_sha256=sha, file="model.xml", offset=0, length=1)
    assert _error(node.request(negative.to_json().replace(b'"offset":0', b'"offset":-5'))) == (
        "bad_request"
    )
    huge = b'{"pad": "' + b"x" * 1_000_000 + b'"}'
    reply = node.request(huge)
    assert _error(reply) == "bad_request" and reply is not None and "over" in reply.props["message"]

    # No usable Response Topic: no reply at all (logged), and no crash.
    spy = Collector(broker.settings("node-2"), T.fetch_reply("node-2"), name="spy")
    req = FetchRequest(manifest_sha256=sha, file="model.xml", offset=0, length=10)
    assert node.request(req.to_json(), response_topic=T.fetch_reply("node-2"), timeout=1.0) is None
    assert node.request(b"{", response_topic=T.replies("node-1", "x"), timeout=1.0) is None
    assert spy.messages == []
    spy.close()

    ok = node.fetch(sha, "model.xml", 0, 10)
    assert ok.payload == (bundles.v1 / "model.xml").read_bytes()[:10]
    assert operator.stats().fetch_errors >= 12


def test_a_node_cannot_fetch_for_another_node(
    broker: Broker, hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    """The topic names the node: node-1 may publish only on its own fetch topic (the
    broker refuses the other's), the hub answers only on the topic's node's reply
    topic, and counts bytes only for node ids that came from a topic."""
    operator.push(bundles.v1)
    sha = bundles.sha(bundles.v1)
    node = fake_nodes("node-1")
    spy = Collector(broker.settings("node-2"), T.fetch_reply("node-2"), name="spy")
    req = FetchRequest(manifest_sha256=sha, file="model.xml", offset=0, length=10).to_json()
    with pytest.raises(PublishRefused):
        node.request(req, topic=T.hub_fetch("node-2"))
    # node-1 on its own topic, asking for the replies to go to node-2: dropped
    assert node.request(req, response_topic=T.fetch_reply("node-2"), timeout=1.0) is None
    # a version-1 body naming another node is not a valid request at all
    named = req.replace(b"{", b'{"node_id":"node-2",', 1)
    assert _error(node.request(named)) == "bad_request"
    assert (
        node.fetch(sha, "model.xml", 0, 10).payload == (bundles.v1 / "model.xml").read_bytes()[:10]
    )
    assert spy.messages == []
    spy.close()
    assert set(operator.stats().bytes_by_node) == {"node-1"}
    assert by_node(hub.fetch.served()) == {"node-1": 10}
