"""Reading an image request from a message (node/requests.py): who sent it, its id,
and the key its crashes are counted under."""

from __future__ import annotations

import hashlib

from cellwatch.node.requests import journal_key, read_request
from cellwatch.shared.schemas import utcnow
from tests.edge import message
from tests.harness import T


def read(topic: str, payload: bytes, image_id: str | None = None) -> str:
    user = (("image_id", image_id),) if image_id else ()
    req, invalid = read_request(message(topic, payload, user=user), T, "node-1", utcnow(), 0.0)
    assert invalid is None
    return journal_key(req)


def test_crashes_are_counted_per_sender_and_content_never_per_name() -> None:
    a, b = b"image of lab A", b"image of lab B"
    key = read(T.lab_images("client-labA", "s"), a, "Im001_1")
    assert key == f"client-labA:{hashlib.sha256(a).hexdigest()}"
    assert read(T.lab_images("client-labB"), b, "Im001_1") != key  # same name
    assert read(T.lab_images("client-labB"), a, "Im001_1") != key  # same content, other lab
    assert read(T.node_lab_images("node-1", "client-labA"), a, "other-name") == key


def test_an_image_without_an_id_gets_one_from_its_content() -> None:
    payload = b"bytes"
    req, _ = read_request(message(T.lab_images("client"), payload), T, "node-1", utcnow(), 0.0)
    assert (req.source, req.scope) == ("client", None)
    assert req.image_id == hashlib.sha256(payload).hexdigest()[:16]
