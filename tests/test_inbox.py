"""The queries the answered store keeps until answered (edged.service.inbox): the record
round-trips everything generation and routing need, and lives exactly until the reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edged.domain import Priority, Query, Turn, TurnRole
from edged.mqtt.routing import ReplyRoute
from edged.service.answer_store import AnswerStore
from edged.service.inbox import decode_work, encode_work
from edged.service.outcomes import QueryWork

TTL_S = 3600.0


def _work(**fields: object) -> QueryWork:
    query = Query(
        id=str(fields.get("id", "q1")),
        text="Chest feels tight since this morning — é, 心",
        max_tokens=64,
        stream=True,
        priority=Priority.URGENT,
        deadline_s=fields.get("deadline_s", 12.5),  # type: ignore[arg-type]
        include_vitals=False,
        reply_to=fields.get("reply_to", "clinic/replies/w1"),  # type: ignore[arg-type]
        history=(Turn(TurnRole.USER, "earlier"), Turn(TurnRole.ASSISTANT, "an answer")),
    )
    return QueryWork(query, ReplyRoute("edged/v1/w1/advice", fields.get("corr", b"\x00\xffid")))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields", [{}, {"deadline_s": None, "reply_to": None, "corr": None}], ids=["full", "bare"]
)
def test_a_kept_query_comes_back_as_it_was_queued(fields: dict[str, object]) -> None:
    work = _work(**fields)
    assert decode_work(encode_work(work)) == work


@pytest.mark.parametrize(
    ("record", "named"),
    [
        (b"not json", "JSONDecodeError"),
        (json.dumps({"v": 99}).encode(), "version 99"),
        (json.dumps({"v": 1, "id": "q1"}).encode(), "KeyError"),
    ],
)
def test_an_unreadable_record_is_a_value_error_naming_the_problem(
    record: bytes, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        decode_work(record)


def test_a_kept_query_lives_until_its_reply_is_stored(tmp_path: Path) -> None:
    store = AnswerStore(tmp_path / "answered.sqlite3", ttl_s=TTL_S)
    try:
        store.add_pending("w1", "q1", b"first", now=1000.0)
        store.add_pending("w2", "q2", b"second", now=1001.0)
        assert store.pending() == [("w1", "q1", b"first"), ("w2", "q2", b"second")]
        store.put("w1", "q1", "edged/v1/w1/advice", b'{"id":"q1"}', None)
        assert store.pending() == [("w2", "q2", b"second")]
        store.purge(now=1001.0 + TTL_S + 1)  # unanswered for a whole TTL: stale
        assert store.pending() == []
    finally:
        store.close()


def test_a_kept_query_survives_the_process(tmp_path: Path) -> None:
    path = tmp_path / "answered.sqlite3"
    first = AnswerStore(path, ttl_s=TTL_S)
    first.add_pending("w1", "q1", encode_work(_work()))
    first.close()
    again = AnswerStore(path, ttl_s=TTL_S)
    try:
        ((wearer, query_id, record),) = again.pending()
        assert (wearer, query_id) == ("w1", "q1") and decode_work(record) == _work()
    finally:
        again.close()


def test_a_durable_store_takes_over_the_queries_a_degraded_run_kept(tmp_path: Path) -> None:
    volatile = AnswerStore(tmp_path / "ram" / "answered.sqlite3", ttl_s=TTL_S)
    volatile.add_pending("w1", "open", b"still to answer")
    volatile.add_pending("w1", "done", b"answered on the durable side")
    volatile.close()
    durable = AnswerStore(tmp_path / "disk" / "answered.sqlite3", ttl_s=TTL_S)
    try:
        durable.put("w1", "done", "t", b"reply", None)
        durable.absorb(tmp_path / "ram" / "answered.sqlite3")
        assert durable.pending() == [("w1", "open", b"still to answer")]
    finally:
        durable.close()
