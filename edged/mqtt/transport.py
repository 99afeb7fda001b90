"""The MQTT transport: one paho client, its own network thread, reconnects, acks.

It knows topics and delivery, not business logic: inbound messages go to one callback, as
plain `InboundMessage`s; callers publish bytes and may ask to be told when the broker has
acknowledged them (which is when the daemon acknowledges the query that caused them).

`connected` means the broker accepted the connection (CONNACK); `ready` means it has also
acknowledged the subscriptions (SUBACK). Only then is a query published by a gateway sure to
reach this node, so readiness (systemd's READY=1, the `online` status) waits for `ready`.

Why its own network loop instead of paho's `loop_start()`:
* reconnect with exponential backoff *and jitter*, so a ward of boards that lost the broker
  together do not hammer it together when it returns;
* a connect timeout that covers the CONNACK, not only the TCP connect: under TLS 1.3 a
  rejected client certificate surfaces only after `connect()` returned;
* knowing which connection a message arrived on: a PUBACK for a message of an earlier
  connection must not be sent on a later one, where its packet id may mean another message.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.config.models import MqttConfig, TlsConfig

log = logging.getLogger(__name__)

_EARLY_ACK_MAX = 4096
"""Acknowledgements kept for a publish() that has not registered its callback yet: it looks
within microseconds, so only the newest few matter."""
_STABLE_CONNECTION_S = 10.0


@dataclass(frozen=True)
class AckToken:
    mid: int
    qos: int
    connection: int
    link: str = ""
    """The client id of the connection that received the message: a node in a share group has
    a second connection for its queries, and an acknowledgement must go back on the one the
    message came in on."""


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None
    correlation_data: bytes | None
    ack: AckToken


def _write_on_network_thread(client: mqtt.Client, userdata: object, sock: object) -> None:
    """paho's external-loop hook, set so that paho never writes from the publishing thread; the
    network thread's loop() writes what is queued (see MqttTransport._make_client)."""


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter (AWS architecture blog, 2015): uniform in
    [low, min(high, low * 2**attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 30)))
    return rng.uniform(low, max(low, ceiling))


CREDENTIAL_NAME = "mqtt-password"


def read_password(cfg: MqttConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The broker password: `password_file`, else `password`, else the systemd credential
    `mqtt-password` (LoadCredential= in the unit), so it never has to sit in the YAML."""
    if cfg.password_file is not None:
        return cfg.password_file.read_text().rstrip("\r\n")
    if cfg.password is not None:
        return cfg.password
    creds = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        return (Path(creds) / CREDENTIAL_NAME).read_text().rstrip("\r\n")
    return None


def apply_credentials(client: mqtt.Client, cfg: MqttConfig) -> None:
    """User name, password and TLS from the config: the daemon's client and `edged doctor`'s
    probe must present the broker the very same credentials. Raises OSError when the password
    file or a certificate cannot be read."""
    if cfg.username is not None:
        client.username_pw_set(cfg.username, read_password(cfg))
    if cfg.tls is not None:
        client.tls_set(
            ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
            certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
            keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(cfg.tls.insecure)


def no_connack_reason(rc: int, timeout_s: float, tls: TlsConfig | None) -> str:
    """Why a connection that opened got no CONNACK, from what paho's loop returned: a server
    that says nothing, one that hangs up, and one that answers in another protocol (an HTTP or
    SSH port given as the broker's) are different mistakes, and each has its own fix."""
    mutual = tls is not None and tls.cert_file is not None
    if rc == mqtt.MQTT_ERR_SUCCESS:
        hint = " or the broker ignored the TLS client certificate" if mutual else ""
        return f"no CONNACK within {timeout_s:g} s (not an MQTT port{hint}?)"
    if rc == mqtt.MQTT_ERR_PROTOCOL:
        return "the server answered with something that is not MQTT (is this the broker's port?)"
    closed = "the server closed the connection before CONNACK"
    if mutual:
        return f"{closed} (TLS client certificate rejected?)"
    if tls is not None:
        return f"{closed} (does the broker require a TLS client certificate, mqtt.tls.cert_file?)"
    return f"{closed} (a TLS port without mqtt.tls? or not an MQTT server)"


class MqttTransport:
    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        will: tuple[str, bytes] | None,
        on_message: Callable[[InboundMessage], None],
        on_ready: Callable[[], None] | None = None,
        receive_maximum: int | None = None,
    ) -> None:
        """`receive_maximum`: MQTT 5 Receive Maximum, the QoS 1 messages the broker may have
        unacknowledged at this client (its default is 65535)."""
        self._cfg = cfg
        self._client_id = client_id
        self._subscriptions = list(subscriptions)
        self._will = will
        self._receive_maximum = receive_maximum
        self._on_message_cb = on_message
        self._on_ready_cb = on_ready
        self._protocol = mqtt.MQTTv5
        self._client = self._make_client()
        self._connection = 0
        self._connack: ReasonCode | int | None = None
        self._subscribe_mid: int | None = None
        self._connected = threading.Event()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, Callable[[], None]] = {}
        self._early: dict[int, float] = {}
        self._publishing = 0
        """publish() calls between paho's publish and their registration: only while one is,
        can an acknowledgement without a callback be claimed (see _on_publish)."""
        self._rng = random.Random()
        name = "mqtt-network" if will is not None else f"mqtt-{client_id}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- public ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def ready(self) -> bool:
        """Connected and subscribed: the broker has acknowledged every subscription."""
        return self._ready.is_set()

    @property
    def alive(self) -> bool:
        """The network thread runs (connected or reconnecting)."""
        return self._thread.is_alive()

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected *and* subscribed (SUBACK received)."""
        return self._ready.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        on_acked: Callable[[], None] | None = None,
    ) -> bool:
        """Publish, or queue while disconnected (paho keeps QoS 1 messages across reconnects,
        up to mqtt.max_outbox). `on_acked` runs on the network thread once the broker has
        the message. Returns False when the outbox is full and the message was dropped."""
        props = None
        if self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.PayloadFormatIndicator = 1
            props.ContentType = "application/json"
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        started = time.monotonic()
        with self._lock:
            self._publishing += 1
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except BaseException:
            with self._lock:
                self._end_publish(None)
            raise
        with self._lock:
            acked_at = self._end_publish(info.mid)
            # Only an acknowledgement seen since this publish began can be its own: paho's
            # packet ids wrap at 65535, and an older one belongs to an earlier message that
            # had the same id (acking the query then would ack it before its reply is out).
            acked = acked_at is not None and acked_at >= started
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE and qos and on_acked is not None and not acked:
                self._pending[info.mid] = on_acked
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            log.error(
                "outbox full (%d messages): dropped a message to %s", self._cfg.max_outbox, topic
            )
            return False
        if qos == 0 or on_acked is None or not acked:
            return True
        # The PUBACK beat us to the registration: the broker has it already.
        on_acked()
        return True

    def ack(self, token: AckToken) -> None:
        """Acknowledge an inbound QoS 1 message, if its connection is still the current one.
        Otherwise the broker redelivers it on the new connection, and that copy is acked."""
        if token.qos == 0:
            return
        if token.connection != self._connection or not self.connected:
            log.debug(
                "not acking mid %d of connection %d: connection %d is current",
                token.mid,
                token.connection,
                self._connection,
            )
            return
        log.debug("ack mid %d on connection %d", token.mid, token.connection)
        self._client.ack(token.mid, token.qos)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) and end the network thread."""
        self._stopping.set()
        if self.connected:
            props = None
            if self._protocol == mqtt.MQTTv5:
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = self._cfg.session_expiry_s
            self._client.disconnect(properties=props)
        self._thread.join(timeout)

    def wait_for_outbox(self, timeout: float) -> bool:
        """Wait until every QoS 1 publish with an `on_acked` has been acknowledged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.02)
        return False

    # -- client setup ----------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        cfg = self._cfg
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=self._protocol,
            clean_session=None if self._protocol == mqtt.MQTTv5 else False,
            manual_ack=True,
        )
        client.connect_timeout = cfg.connect_timeout_s
        client.max_queued_messages_set(cfg.max_outbox)
        apply_credentials(client, cfg)
        if self._will is not None:
            will_topic, will_payload = self._will
            client.will_set(will_topic, will_payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        # All socket I/O on the network thread. Without an external-loop callback, paho 2.2's
        # publish() and ack() write to the socket inline in the calling thread (when paho runs
        # no loop thread of its own, as here): that thread holds paho's outgoing-message lock
        # and, once a QoS 0 packet is out, waits for its callback lock to run on_publish, while
        # the network thread, inside on_message holding the callback lock, publishes a reply
        # and waits for the outgoing-message lock. A deadlock of every thread, found by
        # tools/soak.py after 56 minutes (tests/test_transport_threads.py). With this callback
        # set, paho only queues the packet and wakes loop()'s select through its socket pair.
        client.on_socket_register_write = _write_on_network_thread
        client.suppress_exceptions = True
        return client

    # -- network thread --------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        short_lived = 0
        while not self._stopping.is_set():
            if self._connect_once():
                connected_at = time.monotonic()
                while not self._stopping.is_set():
                    rc = self._client.loop(timeout=0.2)
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        break
                # Only a connection that held resets the backoff: one that the broker drops
                # at once (bad ACL, another client taking the session) must not turn into a
                # reconnect loop.
                if time.monotonic() - connected_at >= _STABLE_CONNECTION_S:
                    attempt = short_lived = 0
                else:
                    short_lived += 1
                    if short_lived == 3:
                        log.error(
                            "broker %s:%d keeps dropping the connection right after accepting "
                            "it; is another client using client id %r (two daemons with the "
                            "same node_id)?",
                            self._cfg.host,
                            self._cfg.port,
                            self._client_id,
                        )
            self._connected.clear()
            self._ready.clear()
            if self._stopping.is_set():
                break
            delay = backoff_delay(
                attempt, self._cfg.reconnect_min_s, self._cfg.reconnect_max_s, self._rng
            )
            attempt += 1
            self._stopping.wait(delay)
        # Flush the DISCONNECT packet queued by stop().
        for _ in range(5):
            if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._cfg.session_expiry_s
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        return props

    def _connect_once(self) -> bool:
        cfg = self._cfg
        self._connection += 1
        self._connack = None
        try:
            if self._protocol == mqtt.MQTTv5:
                self._client.connect(
                    cfg.host,
                    cfg.port,
                    cfg.keepalive_s,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
            else:
                self._client.connect(cfg.host, cfg.port, cfg.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            # A configuration problem, not a network blip: say which settings to look at.
            log.error(
                "broker %s:%d: TLS certificate check failed: %s (trusted CA: mqtt.tls.ca_file = "
                "%s; mqtt.host must be a name in the broker's certificate)",
                cfg.host,
                cfg.port,
                exc.verify_message or exc,
                cfg.tls.ca_file if cfg.tls else None,
            )
            return False
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("cannot connect to broker %s:%d: %s", cfg.host, cfg.port, exc)
            return False
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            # Without it, Nagle + delayed ACK cost ~40-90 ms per QoS 1 round trip on loopback.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + cfg.connect_timeout_s
        rc = mqtt.MQTT_ERR_SUCCESS
        while self._connack is None and time.monotonic() < deadline:
            if self._stopping.is_set():
                return False
            rc = self._client.loop(timeout=0.1)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                break
        connack = self._connack
        if connack is None:
            why = no_connack_reason(rc, cfg.connect_timeout_s, cfg.tls)
            log.warning("broker %s:%d did not accept the connection: %s", cfg.host, cfg.port, why)
            self._client.disconnect()
            return False
        if _is_failure(connack):
            if self._protocol == mqtt.MQTTv5 and _unsupported_protocol(connack):
                log.warning("broker refuses MQTT 5; falling back to MQTT 3.1.1")
                self._protocol = mqtt.MQTTv311
                self._client = self._make_client()
            else:
                log.error("broker %s:%d refused the connection: %s", cfg.host, cfg.port, connack)
            return False
        return True

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason_code: ReasonCode,
        properties: object,
    ) -> None:
        self._connack = reason_code
        if _is_failure(reason_code):
            return
        session = getattr(flags, "session_present", None)
        log.info(
            "connected to broker %s:%d (MQTT %s, session present: %s)",
            self._cfg.host,
            self._cfg.port,
            self.protocol,
            session,
        )
        # Ready only at the SUBACK: the callback runs on this thread, after this returns, so
        # the mid is recorded before its acknowledgement can be seen.
        _, self._subscribe_mid = client.subscribe(list(self._subscriptions))
        self._connected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: object,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        for (topic, _), code in zip(self._subscriptions, reason_codes, strict=False):
            if _is_failure(code):
                # Not a timing problem that waiting would fix: an ACL or a broker limit. Ready
                # all the same, so what is granted is served; the operator is told what is not.
                log.error(
                    "broker %s:%d refused the subscription to %s: %s",
                    self._cfg.host,
                    self._cfg.port,
                    topic,
                    code,
                )
        log.info("subscribed to %d topic filters: ready", len(self._subscriptions))
        self._ready.set()
        if self._on_ready_cb is not None:
            try:
                self._on_ready_cb()
            except Exception:
                log.exception("on_ready handler failed")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason_code: ReasonCode,
        properties: object,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._ready.clear()
        if was_connected and not self._stopping.is_set():
            log.warning(
                "lost the connection to broker %s:%d (%s); reconnecting",
                self._cfg.host,
                self._cfg.port,
                reason_code,
            )

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # paho decodes topics as UTF-8 lazily
            topic = msg._topic.decode("utf-8", "replace")
        log.debug(
            "received mid %d (qos %d, dup %s) on connection %d: %s",
            msg.mid,
            msg.qos,
            bool(msg.dup),
            self._connection,
            topic,
        )
        message = InboundMessage(
            topic=topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=response_topic if isinstance(response_topic, str) else None,
            correlation_data=bytes(correlation) if correlation is not None else None,
            ack=AckToken(msg.mid, msg.qos, self._connection, self._client_id),
        )
        try:
            self._on_message_cb(message)
        except Exception:
            # The handler answers every message itself; reaching here is a bug, and the
            # message stays unacked so the broker redelivers it.
            log.exception("message handler failed on topic %s", topic)

    def _end_publish(self, mid: int | None) -> float | None:
        """With the lock held, as a publish() leaves paho: when the broker acknowledged `mid`
        already, and, once no publish() is left in that window, the table emptied (nothing
        can claim what it holds then)."""
        self._publishing -= 1
        acked_at = self._early.pop(mid, None) if mid is not None else None
        if not self._publishing:
            self._early.clear()
        return acked_at

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: object,
    ) -> None:
        with self._lock:
            callback = self._pending.pop(mid, None)
            if callback is None:
                if not self._publishing:
                    # No publish() is between paho and its registration, so nothing can claim
                    # this one (a stream's QoS 0 chunk, or a stale id): keeping it would only
                    # grow the table with every chunk until the cap.
                    return
                # The oldest entries go first, each in O(1).
                self._early.pop(mid, None)
                self._early[mid] = time.monotonic()
                while len(self._early) > _EARLY_ACK_MAX:
                    del self._early[next(iter(self._early))]
                return
        try:
            callback()
        except Exception:
            log.exception("publish-acknowledged handler failed")


def _value(code: ReasonCode | int) -> int:
    return int(code.value) if isinstance(code, ReasonCode) else int(code)


def _is_failure(code: ReasonCode | int) -> bool:
    if isinstance(code, ReasonCode):
        return bool(code.is_failure)
    return code != 0


def _unsupported_protocol(code: ReasonCode | int) -> bool:
    # MQTT 5 reason 0x84 "Unsupported Protocol Version"; a 3.1.1 broker answers 0x01.
    return _value(code) in (0x84, 0x01)
