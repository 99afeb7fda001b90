"""Publishing from several threads while the network thread answers inbound messages: no
deadlock (found by tools/soak.py's hour, issue #16: after 56 minutes every thread of the daemon
waited on another, the watchdog stopped and 189 queries and 154 alerts were never answered).

paho 2.2, run by a loop of our own rather than its loop_start(), writes to the socket inline in
whatever thread calls publish() or ack(). That thread holds paho's outgoing-message lock and,
once a QoS 0 message is written, waits for paho's callback lock to run on_publish; the network
thread, inside on_message holding the callback lock, publishes a reply and waits for the
outgoing-message lock. The transport now does all socket I/O on its network thread; other
threads queue and wake it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edged.config.loader import parse_config
from edged.mqtt.transport import InboundMessage, MqttTransport
from edged.service.broker import PrivateBroker
from tests._mqtt import daemon_config

INBOUND = 3000
PUBLISHERS = 3
EACH = 1500


def test_publishing_from_other_threads_while_replying_on_the_network_thread(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    cfg = parse_config(daemon_config(broker.port, tmp_path, mqtt={"max_outbox": 100_000})).mqtt
    link: MqttTransport

    def reply(msg: InboundMessage) -> None:  # like the dispatcher's error replies
        time.sleep(0.001)  # validating and scoring take a while: the window the race needs
        link.publish("t/replies", msg.payload, qos=1)
        link.ack(msg.ack)

    link = MqttTransport(cfg, "threads", [("t/in", 1)], None, reply)
    counted = {"t/replies": 0, "t/chunks": 0}
    lock = threading.Lock()

    def count(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        with lock:
            counted[m.topic] += 1

    sink = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sink.on_message = count
    subscribed = threading.Event()
    sink.on_subscribe = lambda *args: subscribed.set()
    sink.connect("127.0.0.1", broker.port)
    sink.subscribe([("t/replies", 1), ("t/chunks", 1)])
    sink.loop_start()
    source = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    source.connect("127.0.0.1", broker.port)
    source.loop_start()
    link.start()
    try:
        assert link.wait_ready(10)
        assert subscribed.wait(5)  # the sink's SUBACK: its subscriptions are in place

        def chunks() -> None:  # stream chunks (QoS 0) and final replies (QoS 1), as the worker
            for n in range(EACH):
                link.publish("t/chunks", b"%d" % n, qos=n % 2)

        publishers = [threading.Thread(target=chunks) for _ in range(PUBLISHERS)]
        for thread in publishers:
            thread.start()
        for n in range(INBOUND):
            source.publish("t/in", b"%d" % n, qos=1)
        for thread in publishers:
            thread.join(20)
        assert not any(t.is_alive() for t in publishers), "a publishing thread is stuck"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and counted["t/replies"] < INBOUND:
            time.sleep(0.1)
        assert counted["t/replies"] == INBOUND, counted
        assert counted["t/chunks"] == PUBLISHERS * EACH, counted
        assert link.wait_for_outbox(10)
    finally:
        link.stop(timeout=5)
        for client in (source, sink):
            client.loop_stop()
            client.disconnect()


def test_publish_only_queues_and_the_network_thread_writes(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    """The cause of the deadlock, shown deterministically: with the transport's own paho
    setup, publish() writes nothing to the socket; the next loop() (the network thread's) does."""
    cfg = parse_config(daemon_config(broker.port, tmp_path)).mqtt
    link = MqttTransport(cfg, "inline", [], None, lambda m: None)
    client = link._make_client()  # the paho client as the transport configures it
    got = threading.Event()
    sink = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sink.on_message = lambda c, u, m: got.set()
    subscribed = threading.Event()
    sink.on_subscribe = lambda *args: subscribed.set()
    sink.connect("127.0.0.1", broker.port)
    sink.subscribe("t/inline", 0)
    sink.loop_start()
    try:
        client.connect("127.0.0.1", broker.port)
        for _ in range(10):  # the handshake, as the network thread runs it
            client.loop(timeout=0.05)
        assert client.is_connected()
        assert subscribed.wait(5)  # the sink's SUBACK: its subscription is in place
        client.publish("t/inline", b"x", qos=0)
        assert not got.wait(0.5), "publish() wrote to the socket outside the network loop"
        client.loop(timeout=0.05)
        assert got.wait(5)
    finally:
        client.disconnect()
        sink.loop_stop()
        sink.disconnect()
