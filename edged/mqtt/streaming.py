"""Coalescing of streamed answer text into `{id, seq, delta}` chunks.

A token is a few characters; one MQTT message per token would flood a slow Wi-Fi link to the
broker. Pieces are gathered and sent at most once per `interval_ms`, or sooner once
`max_pieces` have gathered. The concatenation of all deltas is exactly the final text because
the engine only hands over text that can no longer change (UTF-8 complete, not part of a
possible stop string).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edged.mqtt.payloads import chunk_payload, encode


class ChunkStreamer:
    def __init__(
        self,
        query_id: str,
        send: Callable[[bytes], None],
        interval_ms: float,
        max_pieces: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._id = query_id
        self._send = send
        self._interval_s = interval_ms / 1000.0
        self._max_pieces = max_pieces
        self._clock = clock
        self._buffer: list[str] = []
        self._last_sent = clock()
        self.seq = 0

    def push(self, delta: str) -> None:
        if not delta:
            return
        self._buffer.append(delta)
        if (
            len(self._buffer) >= self._max_pieces
            or self._clock() - self._last_sent >= self._interval_s
        ):
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        delta = "".join(self._buffer)
        self._buffer.clear()
        self._send(encode(chunk_payload(self._id, self.seq, delta)))
        self.seq += 1
        self._last_sent = self._clock()
