"""A publish's `on_acked` runs only when the broker has acknowledged *that* publish.

The daemon acknowledges a query at its reply's PUBACK; acking it any earlier loses the query if
the daemon dies before the reply is out. paho numbers publishes 1..65535 and then starts again,
and the transport remembers acknowledgements that arrive before publish() has registered its
callback. A remembered acknowledgement of an earlier message with the same packet id must not
count for the new one (found reading the transport for issue #16)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from edged.config.loader import parse_config
from edged.mqtt.transport import MqttTransport
from edged.service.broker import PrivateBroker
from tests._mqtt import daemon_config

PACKET_IDS = 65535


def test_an_old_acknowledgement_with_the_same_packet_id_does_not_ack_a_new_publish(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    cfg = parse_config(daemon_config(broker.port, tmp_path, mqtt={"max_outbox": 100_000})).mqtt
    link = MqttTransport(cfg, "wrap", [("t/none", 1)], None, lambda message: None)
    link.start()
    try:
        assert link.wait_ready(10)
        # A QoS 1 publish nobody waits on (an alert, a status): its PUBACK arrives after
        # publish() returned. A second publish, waited on, tells when the broker has both.
        link.publish("t/status", b"first", qos=1)
        flushed = threading.Event()
        link.publish("t/status", b"second", qos=1, on_acked=flushed.set)
        assert flushed.wait(10)
        # Stream chunks (QoS 0) until paho's packet ids come round to the first publish's
        # (the SUBACK took id 1, the two publishes 2 and 3).
        for n in range(PACKET_IDS - 2):
            link.publish("t/chunks", b"%d" % n, qos=0)
        # The broker stops answering: nothing sent from here on can be acknowledged.
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)
        try:
            acked = threading.Event()
            link.publish("t/reply", b"reply", qos=1, on_acked=acked.set)
            assert not acked.wait(1.0), "on_acked ran without the broker acknowledging"
        finally:
            broker.process.send_signal(signal.SIGCONT)
        assert acked.wait(10), "the reply's own PUBACK did not run on_acked"
    finally:
        link.stop()
