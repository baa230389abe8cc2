"""Who may connect: no anonymous users, no wrong passwords; TLS with the test CA."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from cellwatch.shared.errors import MqttError
from cellwatch.shared.mqtt import MqttClient
from cellwatch.shared.topics import Topics
from tests.broker import WAIT_S, Broker, Inbox

T = Topics()
NOT_AUTHORIZED = 0x87


def connack(broker: Broker, username: str | None, password: str | None) -> ReasonCode:
    """The reason code of the broker's CONNACK to a raw MQTT v5 CONNECT."""
    codes: list[ReasonCode] = []
    done = threading.Event()

    def on_connect(
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        rc: ReasonCode,
        properties: Properties | None,
    ) -> None:
        codes.append(rc)
        done.set()
        client.disconnect()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-raw", protocol=paho.MQTTv5)
    if username is not None:
        c.username_pw_set(username, password)
    c.on_connect = on_connect
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        assert done.wait(WAIT_S), "no CONNACK"
    finally:
        c.loop_stop()
    return codes[0]


def test_anonymous_client_is_refused(broker: Broker) -> None:
    rc = connack(broker, None, None)
    assert rc.value == NOT_AUTHORIZED, rc
    with pytest.raises(MqttError, match="refused"):
        MqttClient(broker.settings(None), client_id="test-anon", clean_start=True).connect()


@pytest.mark.parametrize("user", ["client", "node-1", "nobody"])
def test_wrong_password_is_refused(broker: Broker, user: str) -> None:
    # Mosquitto 2.0 answers "not authorized" (0x87), not "bad user name or password".
    rc = connack(broker, user, "wrong-password")
    assert rc.value == NOT_AUTHORIZED, rc
    settings = broker.settings(None, username=user, password=SecretStr("wrong-password"))
    with pytest.raises(MqttError, match="refused"):
        MqttClient(settings, client_id="test-wrong", clean_start=True).connect()


def test_right_password_is_accepted(broker: Broker) -> None:
    for user in ("hub", "operator", "client", *broker.nodes):
        rc = connack(broker, user, broker.password(user))
        assert not rc.is_failure, f"{user}: {rc}"


def test_tls_listener_with_the_ca(broker: Broker) -> None:
    inbox = Inbox()
    broker.connect(
        "node-1",
        tls=True,
        subscriptions=[(f, 1) for f in T.lab_images_shared_filters()],
        handler=inbox,
    )
    client = broker.connect("client", tls=True)
    assert client.settings.port == broker.tls_port
    assert client.publish_wait(T.lab_images("client", "scope-1"), b"over tls")
    assert inbox.wait_topic(T.lab_images("client", "scope-1"))
    assert inbox.messages[0].payload == b"over tls"


def test_plain_mqtt_to_the_tls_port_fails(broker: Broker) -> None:
    connected = threading.Event()
    closed = threading.Event()

    def on_connect(
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        rc: ReasonCode,
        properties: Properties | None,
    ) -> None:
        connected.set()

    def on_disconnect(
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        rc: ReasonCode,
        properties: Properties | None,
    ) -> None:
        closed.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-plain", protocol=paho.MQTTv5)
    c.username_pw_set("client", broker.password("client"))
    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.connect(broker.host, broker.tls_port)
    # Run paho's loop by hand: no background thread, no reconnect attempts.
    deadline = time.monotonic() + WAIT_S
    while not closed.is_set() and time.monotonic() < deadline:
        c.loop(timeout=0.1)
    assert closed.is_set(), "the TLS port kept a plain MQTT connection open"
    assert not connected.is_set()
