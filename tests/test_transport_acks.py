"""A publish's `on_acked` runs only when the broker has acknowledged *that* publish.

The daemon acknowledges a query at its reply's PUBACK; acking it any earlier loses the query if
the daemon dies before the reply is out. paho numbers publishes 1..65535 and then starts again,
and the transport remembers acknowledgements that arrive before publish() has registered its
callback. A remembered acknowledgement of an earlier message with the same packet id must not
count for the new one (found reading the transport for issue #16)."""

from __future__ import annotations

import signal
import threading
import tracemalloc
from pathlib import Path

from edged.config.loader import parse_config
from edged.mqtt import transport
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


def test_stream_chunks_leave_no_acknowledgements_behind(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    """Every QoS 0 chunk comes back through paho's on_publish without a callback. The transport
    kept each one (up to 4,096) in case a publish() still registering could claim it, which no
    chunk ever is: a few hundred kB that grew with every answer streamed for the first quarter
    hour, read by the soak as a leak (issue #16). Nothing is kept once no publish() is in
    flight."""
    cfg = parse_config(daemon_config(broker.port, tmp_path, mqtt={"max_outbox": 100_000})).mqtt
    link = MqttTransport(cfg, "chunks", [("t/none", 1)], None, lambda message: None)
    link.start()
    transport_file = tracemalloc.Filter(True, transport.__file__)
    tracemalloc.start()
    try:
        assert link.wait_ready(10)
        before = tracemalloc.take_snapshot().filter_traces([transport_file])
        for n in range(3000):
            link.publish("t/chunks", b"%d" % n, qos=0)
        # A QoS 1 publish after them: its PUBACK comes once paho has written all of them.
        flushed = threading.Event()
        link.publish("t/status", b"after", qos=1, on_acked=flushed.set)
        assert flushed.wait(10)
        after = tracemalloc.take_snapshot().filter_traces([transport_file])
        held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        assert held < 16_000, f"the transport holds {held} bytes more after 3,000 chunks"
    finally:
        tracemalloc.stop()
        link.stop()
