"""Publishing and acknowledging through the transport, for every stage that sends.

`send` turns a `Publish` outcome into a paho publish whose broker acknowledgement triggers the
acknowledgement of the inbound messages it answers (`ack_after`). A publish the transport has
to drop (its outbox full while the broker is away) never triggers them, so those messages are
redelivered on the next connection instead of being lost.
"""

from __future__ import annotations

from collections.abc import Iterable

from edged.mqtt.transport import AckToken, MqttTransport
from edged.service.outcomes import Publish


class Outbox:
    def __init__(self, transport: MqttTransport, *links: MqttTransport) -> None:
        """Publishes go out on `transport`; `links` are further connections whose inbound
        messages are acknowledged through this outbox (a share group's query connection)."""
        self._transport = transport
        self._links = {t.client_id: t for t in (transport, *links)}

    def send(self, message: Publish) -> bool:
        """False when the transport dropped the message (then nothing is acknowledged)."""
        tokens = message.ack_after
        on_acked = (lambda: self.ack_all(tokens)) if tokens else None
        return self._transport.publish(
            message.topic,
            message.payload,
            qos=message.qos,
            retain=message.retain,
            correlation_data=message.correlation,
            on_acked=on_acked,
        )

    def ack(self, token: AckToken) -> None:
        self._links.get(token.link, self._transport).ack(token)

    def ack_all(self, tokens: Iterable[AckToken]) -> None:
        for token in tokens:
            self.ack(token)

    def wait_flushed(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged everything sent with `ack_after`."""
        return self._transport.wait_for_outbox(timeout)
