"""The one MQTT client wrapper node and hub share (paho-mqtt 2.x, MQTT v5).

It always uses CallbackAPIVersion.VERSION2 and MQTT v5, logs in with a user name and
password, optionally over TLS, reconnects with exponential backoff, keeps a
persistent session (clean start off, session expiry from settings), sets a Will,
re-subscribes on every connect, and calls back when each QoS>0 publish is
acknowledged by the broker (so callers can ack their input only then).

The first connection either succeeds or fails once, with one exception and no log
line: `BrokerUnreachable` at once for a closed port or a name that does not resolve,
`ConnectRefused` for a refused CONNECT (a wrong password), MqttError after
connect_timeout_s of silence; it is not tried again. Once connected, a lost
connection is tried again with backoff, and logged.

Received messages leave this module as `Message` values (shared/packets.py, which
holds the values this client takes and gives, re-exported here; `received()` is the
one place that reads their properties, Correlation Data included): no paho type
reaches the code above it. Callbacks run on paho's network thread: handlers must be
short and never block. Log lines name the client by `log_name`, its client id
without the secret part (settings.client_log_name).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cellwatch.shared.errors import MqttError
from cellwatch.shared.mqttloop import NetworkLoop
from cellwatch.shared.packets import (
    AckToken,
    BrokerUnreachable,
    ConnectRefused,
    Message,
    MessageHandler,
    PacketTooLargeError,
    PublishCallback,
    PublishProps,
    Will,
    blank_properties,
    no_ack,
    packet_size,
    publish_packet_size,
    received,
    topic_matches,
)
from cellwatch.shared.settings import MqttSettings, client_log_name

__all__ = [
    "SESSION_TAKEN_OVER",
    "AckToken",
    "BrokerUnreachable",
    "ConnectRefused",
    "Message",
    "MessageHandler",
    "MqttClient",
    "PacketTooLargeError",
    "PublishCallback",
    "PublishProps",
    "Will",
    "no_ack",
    "packet_size",
    "publish_packet_size",
    "received",
    "topic_matches",
]

log = logging.getLogger(__name__)

DisconnectListener = Callable[[ReasonCode | None], None]

HOLD_MAX_S = 5.0
"""Longest a hold on reading lasts before one read pass (and at most keepalive / 4)."""
SESSION_TAKEN_OVER = 0x8E
"""DISCONNECT reason: another connection logged in with our client id."""


def _no_delay(client: paho.Client, userdata: object, sock: object) -> None:
    """Disable Nagle's algorithm: small packets (PUBACKs, Results) must not wait for
    the peer's delayed ACK (~40 ms per round trip otherwise)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttClient:
    """A connected paho client with cellwatch's defaults. Thread-safe for publish/ack."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        will: Will | None = None,
        clean_start: bool = False,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        subscriptions: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.log_name = client_log_name(client_id)
        """client_id without its secret part, for log lines (settings.client_log_name)."""
        self._clean_start = clean_start
        self._receive_maximum = receive_maximum
        self._manual_ack = manual_ack
        self._subscriptions = list(subscriptions)
        self._message_handler: MessageHandler | None = None
        self._connect_listeners: list[Callable[[bool], None]] = []
        self._disconnect_listeners: list[DisconnectListener] = []
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[PublishCallback | None, int]] = {}
        """mid -> (on_done, qos) of publishes not yet acknowledged."""
        self._early: dict[int, bool] = {}
        self._unsubacks: dict[int, threading.Event] = {}
        self._early_unsubacks: set[int] = set()
        self._connected = threading.Event()
        self._first_error: MqttError | None = None
        """Why the first connection failed (None: it has not, or not yet)."""
        self._first_done = threading.Event()
        self._suback_pending: set[int] = set()
        self._generation = 0
        self._closing = False
        self._max_packet_size: int | None = None

        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.resolved_password())
        if settings.tls.enabled:
            c.tls_set(
                ca_certs=str(settings.tls.ca_file) if settings.tls.ca_file else None,
                certfile=str(settings.tls.cert_file) if settings.tls.cert_file else None,
                keyfile=str(settings.tls.key_file) if settings.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            c.tls_insecure_set(not settings.tls.check_hostname)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._min_delay = max(1, round(settings.reconnect_min_s))
        self._max_delay = max(1, round(settings.reconnect_max_s))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_socket_open = _no_delay
        self._client = c
        self._loop = NetworkLoop(
            c,
            name=f"mqtt-{self.log_name}",
            max_hold_s=min(HOLD_MAX_S, settings.keepalive_s / 4),
            backoff=lambda: (self._min_delay, self._max_delay),
            on_connect_error=self._on_connect_error,
        )

    # -- public API ----------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        """True once disconnect() or drop() was called: it will not reconnect."""
        return self._closing

    @property
    def max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size from the last CONNACK (None: no limit given)."""
        return self._max_packet_size

    @property
    def generation(self) -> int:
        """Increments on every successful (re)connect; acks from an older one are void."""
        return self._generation

    def set_message_handler(self, handler: MessageHandler) -> None:
        self._message_handler = handler

    def add_connect_listener(self, listener: Callable[[bool], None]) -> None:
        """listener(session_present) runs on the network thread after each connect."""
        self._connect_listeners.append(listener)

    def add_disconnect_listener(self, listener: DisconnectListener) -> None:
        """listener(reason) runs on the network thread whenever the connection ends
        (reason None: we closed it). It must not block."""
        self._disconnect_listeners.append(listener)

    def route(self, topic_filter: str, handler: MessageHandler) -> None:
        """Send messages matching topic_filter to handler instead of the message
        handler (paho's per-filter callbacks; the network thread, so never block)."""

        def call(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
            try:
                handler(self._received(msg))
            except Exception:  # an exception here would end paho's network loop
                log.exception("%s: handler for %s failed", self.log_name, msg.topic)

        self._client.message_callback_add(topic_filter, call)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        self._subscriptions.append((topic, qos))
        if self.connected:
            self._client.subscribe(topic, qos=qos)
            self._loop.wake()

    def unsubscribe(self, *topics: str, timeout: float = 5.0) -> bool:
        """Stop subscribing to topics (one UNSUBSCRIBE; also after reconnects); True
        once the broker confirmed it (UNSUBACK), False if not connected or no answer
        in time."""
        gone = set(topics)
        self._subscriptions = [(t, q) for t, q in self._subscriptions if t not in gone]
        if self._closing or not topics:
            return False
        # Never call paho while holding our lock: without its network thread, paho runs
        # our callbacks (which take the lock) inside this very call.
        rc, mid = self._client.unsubscribe(list(topics))
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            return False
        self._loop.wake()
        acked = threading.Event()
        with self._lock:
            if mid in self._early_unsubacks:
                self._early_unsubacks.discard(mid)
                return True
            self._unsubacks[mid] = acked
        try:
            return acked.wait(timeout)
        finally:
            with self._lock:
                self._unsubacks.pop(mid, None)

    def reconnect_backoff(self, min_s: float, max_s: float) -> None:
        """Change the reconnect delay: it starts at min_s and doubles up to max_s."""
        self._min_delay = max(1, round(min_s))
        self._max_delay = max(1, round(max_s), round(min_s))

    def hold_reading(self) -> None:
        """Read nothing more from the broker for now (back-pressure: TCP stops it);
        writes, acknowledgements and keepalive go on (shared/mqttloop.py)."""
        self._loop.hold()

    def release_reading(self) -> None:
        self._loop.release()

    def connect(self) -> None:
        """Connect and start the network thread. BrokerUnreachable at once when the
        broker's port refuses the connection or its name does not resolve,
        ConnectRefused when the broker refuses our CONNECT (a wrong password), MqttError
        when it does not answer within connect_timeout_s. A first connection that fails
        is not tried again, and the caller's exception is all that says so."""
        props = blank_properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        s = self.settings
        try:
            self._client.connect_async(
                s.host,
                s.port,
                keepalive=s.keepalive_s,
                clean_start=self._clean_start,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {s.host}:{s.port}: {exc}") from exc
        self._loop.start()
        if not self._first_done.wait(s.connect_timeout_s):
            self._closing = True
            self._stop_loop()
            raise MqttError(
                f"broker {s.host}:{s.port} did not answer within {s.connect_timeout_s:g} s"
            )
        if self._first_error is not None:
            self._stop_loop()
            raise self._first_error

    def _first_failed(self, error: MqttError) -> None:
        """The first connection failed: nothing reconnects, connect() raises error."""
        self._closing = True
        self._first_error = error
        self._first_done.set()

    def _on_connect_error(self, exc: OSError) -> bool:
        """The network thread could not open a connection; True: stop trying. Before
        the first connection succeeded, a refused port or an unknown name ends it at
        once (paho would try again until connect_timeout_s, and then only say that the
        broker did not answer); anything else (a timeout, no route) is tried again."""
        if self._first_done.is_set():
            return self._closing
        s = self.settings
        if isinstance(exc, ConnectionRefusedError):
            reason = (
                f"connection refused by {s.host}:{s.port}: is the broker running, and is "
                "this its port?"
            )
        elif isinstance(exc, socket.gaierror):
            reason = f"cannot resolve the broker's name {s.host!r}: {exc}"
        else:
            return False
        self._first_failed(BrokerUnreachable(reason))
        return True

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        props: PublishProps | None = None,
        on_done: PublishCallback | None = None,
    ) -> int:
        """Queue a publish; on_done(ok) runs when it completes (see PublishCallback).

        A lost or absent connection is not an error: paho keeps a QoS 1/2 message and
        sends it again after the reconnect (the caller learns of it through on_done),
        and drops a QoS 0 one. There is therefore no need (and no safe way) to check
        `connected` first. MqttError if the packet is larger than the broker's Maximum
        Packet Size (the broker would drop the connection, and paho would resend it on
        every reconnect) or for an invalid topic.
        """
        paho_props = props.to_paho() if props else None
        limit = self._max_packet_size
        bound = len(payload) + len(topic.encode()) + 9 + (props.size_bound() if props else 1)
        if limit is not None and bound > limit:  # only then pack the properties to know
            size = publish_packet_size(topic, payload, qos, paho_props)
            if size > limit:
                raise PacketTooLargeError(
                    f"publish to {topic} refused: the packet ({size} bytes) exceeds the "
                    f"broker's maximum packet size ({limit} bytes)"
                )
        try:
            info = self._client.publish(
                topic, payload, qos=qos, retain=retain, properties=paho_props
            )
        except ValueError as exc:  # an invalid topic or QoS
            raise MqttError(f"publish to {topic!r} refused: {exc}") from exc
        self._loop.wake()
        ok_codes = (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST)
        if info.rc not in ok_codes:
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = (on_done, qos)
        if early is not None and on_done is not None:
            on_done(early)
        return info.mid

    def publish_wait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        props: PublishProps | None = None,
        timeout: float = 10.0,
    ) -> bool:
        """Publish and wait until the broker acknowledged it; False on refusal, timeout
        or a connection that did not come back in time (never raises for those)."""
        done = threading.Event()
        result: list[bool] = []

        def _done(ok: bool) -> None:
            result.append(ok)
            done.set()

        self.publish(topic, payload, qos=qos, retain=retain, props=props, on_done=_done)
        return done.wait(timeout) and result[0]

    def _received(self, msg: paho.MQTTMessage) -> Message:
        """msg as a Message whose ack token acknowledges it on this connection."""
        if not self._manual_ack or msg.qos == 0:
            return received(msg)
        mid, qos, generation = msg.mid, msg.qos, self._generation
        return received(msg, lambda: self._ack(mid, qos, generation))

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if generation != self._generation:
            log.debug("not acking mid %d from an older connection (will be redelivered)", mid)
            return
        self._client.ack(mid, qos)
        self._loop.wake()

    def disconnect(self, timeout: float = 5.0, *, session_expiry_s: int | None = None) -> None:
        """Clean disconnect (the broker does not send the Will) and stop the thread.

        session_expiry_s replaces the session's expiry for this disconnect (0: the
        broker drops the session now); MQTT v5 allows it only when it was not 0."""
        self._closing = True
        if self.connected:  # without a connection there is nothing to say
            props = None
            if session_expiry_s is not None and self.settings.session_expiry_s > 0:
                props = blank_properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = session_expiry_s
            self._client.disconnect(properties=props)
        self._stop_loop()
        self._connected.clear()

    def drop(self) -> None:
        """Close the socket without DISCONNECT so the broker publishes the Will (tests)."""
        self._closing = True
        self._loop.stop(flush=False)
        self._connected.clear()  # on_disconnect may not have run before the loop stopped

    # -- paho callbacks (network thread) -------------------------------------
    def _stop_loop(self) -> None:
        self._loop.stop()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if not self._first_done.is_set():  # connect() raises it: nothing to log
                s = self.settings
                refused = f"broker {s.host}:{s.port} refused the connection: {reason_code}"
                self._first_failed(ConnectRefused(refused))
                self._loop.connected_then_closing()
            else:
                log.error("%s: broker refused connection: %s", self.log_name, reason_code)
            client.disconnect()
            return
        self._generation += 1
        self._loop.reset_backoff()
        max_packet = getattr(properties, "MaximumPacketSize", None)
        self._max_packet_size = int(max_packet) if max_packet else None
        self._connected.set()
        log.info(
            "%s: connected to %s:%s (session present: %s)",
            self.log_name,
            self.settings.host,
            self.settings.port,
            flags.session_present,
        )
        self._suback_pending = set()
        for topic, qos in self._subscriptions:
            _, mid = client.subscribe(topic, qos=qos)
            if mid is not None:
                self._suback_pending.add(mid)
        for listener in self._connect_listeners:
            listener(flags.session_present)
        if not self._suback_pending:
            self._first_connect_done()

    def _first_connect_done(self) -> None:
        """connect() returns once the broker confirmed our subscriptions: a message
        published right after it cannot miss us."""
        self._first_done.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        # paho forgets QoS 0 messages it had not sent yet: their callbacks would never run.
        with self._lock:
            dropped = [(mid, cb) for mid, (cb, qos) in self._pending.items() if qos == 0]
            for mid, _ in dropped:
                del self._pending[mid]
        for _, cb in dropped:
            if cb is not None:
                self._call(cb, False)
        if self._first_error is not None:
            pass  # the first connection failed: connect() says why
        elif self._closing:
            log.info("%s: disconnected", self.log_name)
        elif reason_code is not None and reason_code.value == SESSION_TAKEN_OVER:
            log.error(
                "%s: the broker closed our session because another connection logged in "
                "with the same client id (Session taken over)",
                self.log_name,
            )
        else:
            log.warning(
                "%s: connection lost (%s); reconnecting with backoff", self.log_name, reason_code
            )
        for listener in self._disconnect_listeners:
            try:
                listener(None if self._closing else reason_code)
            except Exception:
                log.exception("%s: disconnect listener failed", self.log_name)

    def _call(self, cb: PublishCallback, ok: bool) -> None:
        try:
            cb(ok)
        except Exception:
            log.exception("%s: publish callback failed", self.log_name)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("%s: subscription refused: %s", self.log_name, rc)
        self._suback_pending.discard(mid)
        if not self._suback_pending:
            self._first_connect_done()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        handler = self._message_handler
        if handler is None:
            return
        try:
            handler(self._received(msg))
        except Exception:  # an exception here would end paho's network loop
            log.exception("%s: message handler failed on %s", self.log_name, msg.topic)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        ok = not reason_code.is_failure
        if not ok:
            log.warning("%s: broker refused publish mid %d: %s", self.log_name, mid, reason_code)
        with self._lock:
            if mid in self._pending:
                cb, _ = self._pending.pop(mid)
            else:
                self._early[mid] = ok
                return
        if cb is not None:
            self._call(cb, ok)

    def _on_unsubscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            acked = self._unsubacks.get(mid)
            if acked is None:
                self._early_unsubacks.add(mid)  # UNSUBACK before unsubscribe() returned
        if acked is not None:
            acked.set()
