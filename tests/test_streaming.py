"""Coalescing streamed text into `{id, seq, delta}` chunks, with a fake clock."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edged.mqtt.streaming import ChunkStreamer


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.sent.append(data)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(raw.decode("utf-8")) for raw in self.sent]

    @property
    def deltas(self) -> list[str]:
        return [chunk["delta"] for chunk in self.chunks]


def make_streamer(
    interval_ms: float = 1_000.0, max_pieces: int = 100
) -> tuple[ChunkStreamer, Sink, FakeClock]:
    sink, clock = Sink(), FakeClock()
    streamer = ChunkStreamer(
        "q1", sink, interval_ms=interval_ms, max_pieces=max_pieces, clock=clock
    )
    return streamer, sink, clock


def test_pieces_are_coalesced_until_max_pieces_is_reached() -> None:
    streamer, sink, _ = make_streamer(max_pieces=3)
    streamer.push("a")
    streamer.push("b")
    assert sink.sent == []
    streamer.push("c")
    assert sink.deltas == ["abc"]
    streamer.push("d")
    assert sink.deltas == ["abc"]


def test_a_chunk_is_sent_sooner_once_the_interval_has_passed() -> None:
    streamer, sink, clock = make_streamer(interval_ms=50.0, max_pieces=100)
    streamer.push("a")
    clock.now = 0.04
    streamer.push("b")
    assert sink.sent == []
    clock.now = 0.05
    streamer.push("c")
    assert sink.deltas == ["abc"]


def test_the_interval_counts_from_the_last_send() -> None:
    streamer, sink, clock = make_streamer(interval_ms=50.0, max_pieces=100)
    clock.now = 1.0
    streamer.push("a")
    assert sink.deltas == ["a"]
    clock.now = 1.03
    streamer.push("b")
    assert sink.deltas == ["a"]
    clock.now = 1.06
    streamer.push("c")
    assert sink.deltas == ["a", "bc"]


def test_flush_sends_what_is_left() -> None:
    streamer, sink, _ = make_streamer(max_pieces=10)
    streamer.push("Hello, ")
    streamer.push("world")
    streamer.flush()
    assert sink.deltas == ["Hello, world"]


def test_flush_with_nothing_buffered_sends_nothing() -> None:
    streamer, sink, _ = make_streamer(max_pieces=2)
    streamer.flush()
    assert sink.sent == []
    streamer.push("a")
    streamer.push("b")
    streamer.flush()
    assert sink.deltas == ["ab"]
    assert streamer.seq == 1


def test_empty_deltas_are_ignored() -> None:
    streamer, sink, _ = make_streamer(max_pieces=2)
    streamer.push("a")
    streamer.push("")
    streamer.push("")
    assert sink.sent == []
    streamer.flush()
    assert sink.deltas == ["a"]


def test_seq_starts_at_zero_and_increases_by_one() -> None:
    streamer, sink, _ = make_streamer(max_pieces=1)
    assert streamer.seq == 0
    for piece in ("x", "y", "z"):
        streamer.push(piece)
    assert [chunk["seq"] for chunk in sink.chunks] == [0, 1, 2]
    assert streamer.seq == 3


def test_each_chunk_is_json_with_id_seq_and_delta() -> None:
    streamer, sink, _ = make_streamer(max_pieces=1)
    streamer.push("SpO₂")
    assert sink.chunks == [{"id": "q1", "seq": 0, "delta": "SpO₂"}]


def test_multibyte_text_is_reassembled_exactly() -> None:
    text = "SpO₂ 93 % — ok"
    streamer, sink, clock = make_streamer(interval_ms=20.0, max_pieces=3)
    for i, char in enumerate(text):
        clock.now = i * 0.007
        streamer.push(char)
    streamer.flush()
    assert len(sink.sent) > 1
    assert "".join(sink.deltas) == text
    for raw in sink.sent:
        raw.decode("utf-8")  # every message is valid UTF-8 on its own


@given(
    pieces=st.lists(st.text(max_size=8), max_size=40),
    steps=st.lists(st.floats(min_value=0.0, max_value=0.1), max_size=40),
    max_pieces=st.integers(min_value=1, max_value=6),
    interval_ms=st.floats(min_value=0.0, max_value=100.0),
)
def test_the_deltas_concatenate_to_exactly_the_pushed_text(
    pieces: list[str], steps: list[float], max_pieces: int, interval_ms: float
) -> None:
    streamer, sink, clock = make_streamer(interval_ms=interval_ms, max_pieces=max_pieces)
    for i, piece in enumerate(pieces):
        clock.now += steps[i] if i < len(steps) else 0.0
        streamer.push(piece)
    streamer.flush()
    chunks = sink.chunks
    assert "".join(chunk["delta"] for chunk in chunks) == "".join(pieces)
    assert [chunk["seq"] for chunk in chunks] == list(range(len(chunks)))
    assert all(chunk["delta"] and chunk["id"] == "q1" for chunk in chunks)
    assert streamer.seq == len(chunks)
