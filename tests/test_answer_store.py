"""The durable record of answered queries: byte-identical replays, expiry, restarts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.service.answer_store import KEEP_DAMAGED, AnswerStore

TTL_S = 60.0
T0 = 1_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AnswerStore]:
    opened = AnswerStore(tmp_path / "state" / "answers.db", ttl_s=TTL_S)
    yield opened
    opened.close()


def test_a_stored_reply_comes_back_byte_identical(store: AnswerStore) -> None:
    payload = b'{"id":"q1","text":"SpO\xe2\x82\x82 93 %"}\x00\xff'
    store.put("w1", "q1", "edged/w1/answer", payload, b"corr-1", now=T0)
    reply = store.get("w1", "q1")
    assert reply is not None
    assert reply.payload == payload
    assert isinstance(reply.payload, bytes)
    assert reply.topic == "edged/w1/answer"
    assert reply.correlation == b"corr-1"
    assert reply.answered_at == T0


def test_a_reply_without_correlation_keeps_none(store: AnswerStore) -> None:
    store.put("w1", "q1", "t", b"p", None, now=T0)
    reply = store.get("w1", "q1")
    assert reply is not None
    assert reply.correlation is None


def test_binary_correlation_data_survives_exactly(store: AnswerStore) -> None:
    correlation = bytes(range(256))
    store.put("w1", "q1", "t", b"p", correlation, now=T0)
    reply = store.get("w1", "q1")
    assert reply is not None
    assert reply.correlation == correlation


def test_an_unknown_query_is_not_found(store: AnswerStore) -> None:
    store.put("w1", "q1", "t", b"p", None, now=T0)
    assert store.get("w1", "q2") is None
    assert store.get("w2", "q1") is None


def test_the_same_id_under_two_wearers_is_two_entries(store: AnswerStore) -> None:
    store.put("w1", "q1", "edged/w1/answer", b"for w1", None, now=T0)
    store.put("w2", "q1", "edged/w2/answer", b"for w2", None, now=T0)
    assert len(store) == 2
    first, second = store.get("w1", "q1"), store.get("w2", "q1")
    assert first is not None and second is not None
    assert (first.payload, first.topic) == (b"for w1", "edged/w1/answer")
    assert (second.payload, second.topic) == (b"for w2", "edged/w2/answer")


def test_a_reply_is_served_until_purged_so_a_clock_set_forward_does_not_expire_it(
    store: AnswerStore,
) -> None:
    store.put("w1", "q1", "t", b"p", None, now=T0)
    # The lookup does not read the wall clock: a reply stored "in the past" of a clock that
    # jumped forward by more than the TTL is still the answer to a redelivery.
    assert store.get("w1", "q1") is not None
    store.purge(now=T0 + TTL_S)  # at exactly the TTL it is still kept
    assert store.get("w1", "q1") is not None
    store.purge(now=T0 + TTL_S + 1)
    assert store.get("w1", "q1") is None


def test_purge_deletes_expired_replies_and_counts_them(store: AnswerStore) -> None:
    store.put("w1", "old1", "t", b"p", None, now=T0)
    store.put("w2", "old2", "t", b"p", None, now=T0 + 1)
    store.put("w1", "fresh", "t", b"p", None, now=T0 + 50)
    assert store.purge(now=T0 + TTL_S + 10) == 2
    assert len(store) == 1
    assert store.get("w1", "fresh") is not None
    assert store.get("w1", "old1") is None
    assert store.purge(now=T0 + TTL_S + 10) == 0


def test_a_reply_survives_closing_and_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "answers.db"
    first = AnswerStore(path, ttl_s=TTL_S)
    first.put("w1", "q1", "edged/w1/answer", b"\x01answer", b"c")
    first.close()
    reopened = AnswerStore(path, ttl_s=TTL_S)
    try:
        reply = reopened.get("w1", "q1")
        assert reply is not None
        assert (reply.topic, reply.payload, reply.correlation) == (
            "edged/w1/answer",
            b"\x01answer",
            b"c",
        )
        assert len(reopened) == 1
    finally:
        reopened.close()


def test_len_counts_stored_replies(store: AnswerStore) -> None:
    assert len(store) == 0
    for i in range(3):
        store.put("w1", f"q{i}", "t", b"p", None, now=T0)
    assert len(store) == 3


def test_putting_the_same_key_again_replaces_the_reply(store: AnswerStore) -> None:
    store.put("w1", "q1", "old/topic", b"old", b"old-corr", now=T0)
    store.put("w1", "q1", "new/topic", b"new", None, now=T0 + 5)
    assert len(store) == 1
    reply = store.get("w1", "q1")
    assert reply is not None
    assert (reply.topic, reply.payload, reply.correlation, reply.answered_at) == (
        "new/topic",
        b"new",
        None,
        T0 + 5,
    )


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_a_damaged_store_is_set_aside_and_the_daemon_starts_empty(
    tmp_path: Path, damage: str
) -> None:
    """A power cut or a failing SD card can leave the file unreadable; refusing to start would
    stop the alerts too (found by tools/soak.py, --faults store_corrupt)."""
    path = tmp_path / "answered.sqlite3"
    first = AnswerStore(path, ttl_s=3600)
    first.put("w1", "q1", "edged/v1/w1/advice", b'{"id":"q1"}', None)
    first.close()
    data = path.read_bytes()
    path.write_bytes(os.urandom(8192) if damage == "random" else data[:1000] + os.urandom(64))
    store = AnswerStore(path, ttl_s=3600)
    assert len(store) == 0 and store.get("w1", "q1") is None
    store.put("w1", "q2", "edged/v1/w1/advice", b'{"id":"q2"}', None)
    assert store.get("w1", "q2") is not None
    (aside,) = tmp_path.glob("answered.sqlite3.damaged-*")
    assert aside.stat().st_size > 0  # kept for a post-mortem
    store.close()


def test_only_the_newest_damaged_stores_are_kept(tmp_path: Path) -> None:
    """A card that keeps corrupting the store must not fill up with set-aside copies (the
    hour-long soak left 34 of them)."""
    path = tmp_path / "answered.sqlite3"
    rounds = KEEP_DAMAGED + 2
    for n in range(rounds):  # all within a second or two: the names must not collide
        AnswerStore(path, ttl_s=TTL_S).close()
        path.write_bytes(b"round %d " % n + os.urandom(8192))
    AnswerStore(path, ttl_s=TTL_S).close()
    copies = tmp_path.glob("answered.sqlite3.damaged-*")
    kept = sorted(p.read_bytes()[:7] for p in copies if not p.name.endswith(("-wal", "-shm")))
    assert kept == [b"round %d" % n for n in range(rounds - KEEP_DAMAGED, rounds)]


def test_absorb_copies_in_the_replies_this_store_lacks_and_keeps_its_own(tmp_path: Path) -> None:
    volatile = AnswerStore(tmp_path / "ram" / "answers.db", ttl_s=TTL_S)
    volatile.put("w1", "q1", "t", b"from the degraded run", None)
    volatile.put("w1", "q2", "t", b"stale copy", None)
    volatile.close()
    durable = AnswerStore(tmp_path / "disk" / "answers.db", ttl_s=TTL_S)
    try:
        durable.put("w1", "q2", "t", b"durable copy", None)
        assert durable.absorb(tmp_path / "ram" / "answers.db") == 1
        first, second = durable.get("w1", "q1"), durable.get("w1", "q2")
        assert first is not None and first.payload == b"from the degraded run"
        assert second is not None and second.payload == b"durable copy"
        assert len(durable) == 2
    finally:
        durable.close()


def test_an_in_memory_store_works_like_a_file_one() -> None:
    store = AnswerStore(None, ttl_s=TTL_S)
    try:
        store.put("w1", "q1", "t", b"p", b"c")
        reply = store.get("w1", "q1")
        assert reply is not None and (reply.payload, reply.correlation) == (b"p", b"c")
        assert store.path is None and len(store) == 1
    finally:
        store.close()


def test_a_store_reads_through_to_a_durable_file_it_never_writes(tmp_path: Path) -> None:
    durable_path = tmp_path / "disk" / "answers.db"
    durable = AnswerStore(durable_path, ttl_s=TTL_S)
    durable.put("w1", "old", "t", b"answered before the card went read-only", None)
    # Left open, as after a crash: the reply is in the -wal file, read with mode=ro.
    degraded = AnswerStore(tmp_path / "ram" / "answers.db", TTL_S, read_through=durable_path)
    try:
        old = degraded.get("w1", "old")
        assert old is not None and old.payload == b"answered before the card went read-only"
        degraded.put("w1", "new", "t", b"answered while degraded", None)
        assert len(degraded) == 1  # counts what it holds itself
        assert durable.get("w1", "new") is None  # never written through
    finally:
        degraded.close()
        durable.close()


def test_a_read_through_file_that_cannot_be_read_is_left_out(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-store.db"
    bad.write_bytes(os.urandom(8192))
    store = AnswerStore(None, TTL_S, read_through=bad)
    try:
        assert store.get("w1", "q1") is None
        store.put("w1", "q1", "t", b"p", None)
        reply = store.get("w1", "q1")
        assert reply is not None and reply.payload == b"p"
    finally:
        store.close()
