"""A faulty network link for the tests: a TCP relay between a client and the real mosquitto
that reads whole MQTT packets and can hold back or lose chosen ones, in one direction.

It stands in for what a test cannot otherwise arrange on demand: a SUBSCRIBE that takes a
while to reach the broker (a slow link), or a PUBLISH lost on its way (a connection that died
between the client handing it over and the broker receiving it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 3, 4, 8, 9

# A filter sees each whole packet and says what to do with it: "pass", "drop", or a number of
# seconds to hold it (packets behind it wait too, as on a real link).
Action = str | float
PacketFilter = Callable[[bytes], Action]


def packet_type(packet: bytes) -> int:
    return packet[0] >> 4


def _remaining_length_size(packet: bytes) -> int:
    size = 1
    while packet[size] & 0x80:
        size += 1
    return size


def publish_topic(packet: bytes) -> str:
    """The topic of a PUBLISH packet (MQTT 3.1.1 and 5 alike: the first field)."""
    start = 1 + _remaining_length_size(packet)
    length = int.from_bytes(packet[start : start + 2], "big")
    return packet[start + 2 : start + 2 + length].decode("utf-8", "replace")


def read_packet(conn: socket.socket) -> bytes | None:
    def read(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = read(1)
    if header is None:
        return None
    raw, length, shift = b"", 0, 0
    while True:
        byte = read(1)
        if byte is None:
            return None
        raw += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = read(length) if length else b""
    return None if body is None else header + raw + body


@dataclass
class Seen:
    to_broker: bool
    """The direction: client -> broker (True) or broker -> client."""
    kind: int
    topic: str | None
    """A PUBLISH's topic."""
    action: Action
    at: float
    """time.monotonic() when it was passed on (after any hold) or dropped."""


class FaultyLink:
    """Listens on a free localhost port and relays every connection to `upstream_port`."""

    def __init__(
        self,
        upstream_port: int,
        to_broker: PacketFilter | None = None,
        to_client: PacketFilter | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.to_broker = to_broker
        self.to_client = to_client
        self.seen: list[Seen] = []
        """Every packet relayed or dropped, both directions, in order."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closing = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            for src, dst, to_broker in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, to_broker), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_broker: bool) -> None:
        check = self.to_broker if to_broker else self.to_client
        try:
            while (packet := read_packet(src)) is not None:
                action: Action = "pass" if check is None else check(packet)
                if isinstance(action, (int, float)):
                    time.sleep(action)
                if action != "drop":
                    dst.sendall(packet)
                kind = packet_type(packet)
                topic = publish_topic(packet) if kind == PUBLISH else None
                self.seen.append(Seen(to_broker, kind, topic, action, time.monotonic()))
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        for sock in self._conns:
            with contextlib.suppress(OSError):
                sock.close()
