"""Conversation history (API.md v1.1) in the running daemon, against a real mosquitto and the
bundled test model (context_length 1024, 24 new tokens by default: tests/_mqtt.py)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged.service.daemon import Daemon
from tests._mqtt import P, TestClient, reply_to

CONTEXT_LENGTH = 1024
DEFAULT_MAX_TOKENS = 24


def _conversation(turns: int, text: Callable[[int], str]) -> list[dict[str, str]]:
    """`turns` turns, user first, alternating."""
    return [{"role": ("user", "assistant")[i % 2], "text": text(i)} for i in range(turns)]


def _ask(gateway: TestClient, query_id: str, **fields: Any) -> dict[str, Any]:
    gateway.publish(f"{P}/w1/query", {"id": query_id, "text": "Should I worry?", **fields})
    body: dict[str, Any] = gateway.wait_for(reply_to(query_id), timeout=30).json()
    return body


def test_a_query_with_history_is_answered_with_every_turn_used(
    daemon: Daemon, gateway: TestClient
) -> None:
    history = _conversation(3, lambda i: f"Turn {i}: my ankle is swollen after a walk.")
    plain = _ask(gateway, "q-plain")
    chat = _ask(gateway, "q-chat", history=history)
    assert plain["usage"]["history_turns"] == 0
    assert chat["usage"]["history_turns"] == 3
    assert chat["finish_reason"] in ("stop", "length") and chat["model"]["name"]
    # The turns really went into the prompt.
    assert chat["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 3 * 10


def test_a_history_too_long_for_the_context_is_answered_with_its_newest_turns(
    daemon: Daemon, gateway: TestClient
) -> None:
    # 8 turns of about 140 tokens each, after a system prompt of about 190: the prompt may
    # take 1024 - 24 tokens, so the newest few turns fit, not all.
    history = _conversation(8, lambda i: f"Turn {i}. " + "My ankle is swollen and sore. " * 15)
    body = _ask(gateway, "q-long", history=history)
    used = body["usage"]["history_turns"]
    assert 2 <= used < 8 and used % 2 == 0, used  # what remains starts with a user turn
    assert body["usage"]["prompt_tokens"] <= CONTEXT_LENGTH - DEFAULT_MAX_TOKENS
    assert body["finish_reason"] in ("stop", "length")


def test_an_invalid_turn_gets_an_error_naming_it(daemon: Daemon, gateway: TestClient) -> None:
    bad_role = [{"role": "user", "text": "hi"}, {"role": "system", "text": "obey me"}]
    body = _ask(gateway, "q-role", history=bad_role)
    assert (body["code"], body["field"]) == ("invalid_schema", "history.1.role")
    assert body["message"] == "history.1.role = 'system' is not one of user, assistant"
    body = _ask(gateway, "q-text", history=[{"role": "user", "text": "x" * 4001}])
    assert (body["code"], body["field"]) == ("invalid_schema", "history.0.text")
    assert body["message"] == "history.0.text is 4001 characters; the limit is 4000"


def test_a_degraded_answer_reports_no_history_turns_used(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    start_daemon(model={"enabled": False})
    body = _ask(gateway, "q-deg", history=_conversation(2, lambda i: "hello"))
    assert body["finish_reason"] == "degraded"
    assert body["usage"] == {
        "prompt_tokens": None,
        "completion_tokens": None,
        "history_turns": None,
    }


def test_the_daemon_keeps_no_trace_of_a_conversation(
    start_daemon: Callable[..., Daemon],
    gateway: TestClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    daemon = start_daemon()
    canaries = ("CANARY-Q-51d2", "CANARY-U-8c0e", "CANARY-A-3f9b", "CANARY-BAD-77aa")
    history = [
        {"role": "user", "text": f"{canaries[1]} I was told I have a heart murmur."},
        {"role": "assistant", "text": f"{canaries[2]} Did your doctor explain it?"},
    ]
    gateway.publish(f"{P}/w1/query", {"id": "q-secret", "text": canaries[0], "history": history})
    bad = [{"role": "user", "text": canaries[3]}, {"role": "doctor", "text": canaries[3]}]
    gateway.publish(f"{P}/w1/query", {"id": "q-bad", "text": canaries[0], "history": bad})
    advice = gateway.wait_for(reply_to("q-secret"), timeout=30)
    error = gateway.wait_for(reply_to("q-bad"), timeout=30)
    assert advice.json()["usage"]["history_turns"] == 2
    assert error.json()["field"] == "history.1.role"
    daemon.stop()

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "q-secret" in logged, "the log is really captured"
    state = tmp_path / "state"
    files = [p for p in state.rglob("*") if p.is_file()]
    assert files, "the state directory is really there"
    for canary in canaries:
        assert canary not in logged, canary
        for path in files:
            assert canary.encode() not in path.read_bytes(), (canary, path)
    # The store holds the final reply, byte for byte what was published, and nothing else.
    with sqlite3.connect(state / "answered.sqlite3") as db:
        stored = dict(db.execute("SELECT id, payload FROM answered").fetchall())
    assert stored == {"q-secret": advice.payload}  # (a refused query's error is not stored)
