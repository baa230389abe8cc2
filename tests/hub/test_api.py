"""The hub API's edges: bad input, idempotency, and the broker's ACL."""

from __future__ import annotations

import uuid

import pytest

from cellwatch.hub.client import HubClient
from cellwatch.hub.errors import ApiFailure, HubRefused
from cellwatch.hub.service import HubService
from cellwatch.shared.hubapi import RolloutStartArgs
from cellwatch.shared.limits import MAX_API_REQUEST_BYTES
from cellwatch.shared.schemas import ApiReply, DesiredModel, utcnow
from tests.broker import Broker
from tests.harness import T
from tests.hub.conftest import Bundles, NodeMaker


def raw(client: HubClient, verb: str, payload: bytes) -> ApiReply:
    """Send raw bytes as a request and return the ApiReply (error or not)."""
    return client.raw(verb, payload)


@pytest.mark.parametrize(
    ("verb", "payload", "code"),
    [
        ("models", b"{not json", "bad_request"),
        ("models", b"", "bad_request"),
        ("models", b'{"request_id": "a", "args": {}, "extra": 1}', "bad_request"),
        ("models", b'{"request_id": "a", "args": {"name": "../x"}}', "bad_request"),
        ("nope", b'{"request_id": "a"}', "unknown_verb"),
        ("rollout.start", b'{"request_id": "a", "args": {"name": "toy"}}', "bad_request"),
        ("rollout.status", b'{"request_id": "a", "args": {"rollout_id": "r99"}}', "not_found"),
        (
            "push.commit",
            b'{"request_id": "b", "args": {"upload_id": "' + b"0" * 64 + b'"}}',
            "not_found",
        ),
        ("push.begin", b'{"request_id": "a", "args": {"manifest": "%%%"}}', "bad_request"),
        ("models", b"{" + b" " * MAX_API_REQUEST_BYTES + b"}", "too_large"),
    ],
)
def test_bad_requests_get_an_error_reply(
    hub: HubService, operator: HubClient, verb: str, payload: bytes, code: str
) -> None:
    reply = raw(operator, verb, payload)
    assert not reply.ok and reply.error is not None and reply.error.code == code, reply
    assert operator.models().models == []  # still serving


def test_unknown_model_and_nodes(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    fake_nodes("node-1")
    with pytest.raises(ApiFailure) as err:
        operator.rollout_start(RolloutStartArgs(name="toy", version="9.9.9"))
    assert err.value.code == "not_found" and "toy 9.9.9" in err.value.message
    operator.push(bundles.v1)
    for target, code in (
        ("node:ghost", "not_found"),
        ("group:none", "not_found"),
        ("x", "bad_request"),
    ):
        with pytest.raises(ApiFailure) as err:
            operator.rollout_start(RolloutStartArgs(name="toy", version="1.0.0", target=target))
        assert err.value.code == code, target
    with pytest.raises(ApiFailure) as err:
        operator.rollout_start(RolloutStartArgs(name="toy", version="1.0.0", waves="1,x"))
    assert err.value.code == "bad_request"


def test_a_repeated_request_starts_one_rollout(
    hub: HubService, operator: HubClient, bundles: Bundles, fake_nodes: NodeMaker
) -> None:
    fake_nodes("node-1", behaviour="silent")
    fake_nodes("node-2", behaviour="silent")
    operator.push(bundles.v1)
    args = RolloutStartArgs(name="toy", version="1.0.0")
    rid = uuid.uuid4().hex
    first = operator.rollout_start(args, request_id=rid)
    again = operator.rollout_start(args, request_id=rid)
    assert again == first
    # A new request for the same rollout: the running one, not a second.
    third = operator.rollout_start(args)
    assert third.rollout_id == first.rollout_id and third.existing
    assert [r.rollout_id for r in operator.rollout_list().rollouts] == [first.rollout_id]


@pytest.mark.parametrize("user", ["client", "node-1"])
def test_only_the_operator_may_call_the_hub_or_write_desired(
    broker: Broker, hub: HubService, user: str
) -> None:
    intruder = HubClient(broker.settings(user), timeout_s=5)
    intruder.connect()
    with pytest.raises(HubRefused, match="only the operator"):
        intruder.models()
    intruder.close()
    c = broker.connect(user)
    d = DesiredModel(
        rollout_id="evil",
        model={"name": "toy", "version": "6.6.6", "manifest_sha256": "0" * 64},
        issued_at=utcnow(),
    )
    assert not c.publish_wait(T.desired("node-1"), d.to_json(), qos=1, retain=True)
    assert not c.publish_wait(T.hub_api("upload"), b"x", qos=1)
