"""max_packet_size: the largest image gets through, anything bigger does not."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cellwatch.shared.errors import MqttError
from cellwatch.shared.limits import BROKER_MAX_PACKET_BYTES, MAX_IMAGE_BYTES
from cellwatch.shared.mqtt import PublishProps, publish_packet_size
from cellwatch.shared.topics import Topics
from tests.broker import Broker, Inbox

T = Topics()


def test_largest_image_with_request_properties_is_delivered(broker: Broker) -> None:
    inbox = Inbox()
    broker.connect(
        "node-1", subscriptions=[(f, 1) for f in T.lab_images_shared_filters()], handler=inbox
    )
    client = broker.connect("client")
    props = PublishProps(
        response_topic=T.replies("client", "a" * 64),
        correlation_data=b"c" * 64,
        message_expiry_s=60,
        content_type="image/jpeg",
        user=[("image_id", "i" * 64)],
    )
    payload = b"\xff" * MAX_IMAGE_BYTES
    assert client.publish_wait(T.lab_images("client", "s" * 64), payload, props=props, timeout=30)
    assert inbox.wait_count(1, timeout=30)
    assert inbox.messages[0].payload == payload


def test_oversize_packet_is_not_delivered(broker: Broker) -> None:
    inbox = Inbox()
    broker.connect(
        "node-1", subscriptions=[(f, 1) for f in T.lab_images_shared_filters()], handler=inbox
    )

    # A raw client that ignores the broker's Maximum Packet Size (as an MQTT 3.1.1
    # client, which is never told it, would).
    closed = threading.Event()

    def on_disconnect(
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        rc: ReasonCode,
        properties: Properties | None,
    ) -> None:
        closed.set()

    big = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-big", protocol=paho.MQTTv5)
    big.username_pw_set("client", broker.password("client"))
    big.on_disconnect = on_disconnect
    big.connect(broker.host, broker.port)
    big.publish(T.lab_images("client", "big"), b"\0" * (BROKER_MAX_PACKET_BYTES + 1024), qos=1)
    deadline = time.monotonic() + 30
    while not closed.is_set() and time.monotonic() < deadline:
        big.loop(timeout=0.1)
    assert closed.is_set(), "the broker kept a client that sent an oversize packet"
    # (The broker sends DISCONNECT "packet too large" first, but the client is
    # usually still writing and sees the connection reset instead.)

    # A message published after it arrives; the oversize one never does.
    client = broker.connect("client")
    assert client.publish_wait(T.lab_images("client", "small"), b"small")
    assert inbox.wait_topic(T.lab_images("client", "small"))
    assert inbox.topics() == [T.lab_images("client", "small")]
    assert "oversize packet" in broker.log_text()  # dropped for its size, not the ACL


def test_mqtt_client_refuses_a_packet_over_the_brokers_maximum(broker: Broker) -> None:
    client = broker.connect("client")
    topic = T.lab_images("client", "scope-1")
    # An empty payload needs 1 byte of remaining length, a 20 MiB one 4 bytes.
    overhead = publish_packet_size(topic, b"", 1, None) + 3
    fits = b"\0" * (BROKER_MAX_PACKET_BYTES - overhead)
    assert publish_packet_size(topic, fits, 1, None) == BROKER_MAX_PACKET_BYTES
    with pytest.raises(MqttError, match="maximum packet size"):
        client.publish(topic, fits + b"\0", qos=1)
    # Nothing was sent: the connection is still up and usable.
    assert client.publish_wait(topic, fits, timeout=30)
    assert client.connected
