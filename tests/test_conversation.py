"""Conversation history (API.md v1.1): validating `history`, and the prompt built from it —
the system prompt first, the vitals block leading the conversation, the oldest turns dropped
when the context is short — as pure functions, then through the bundled models' templates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.clinical.advice import user_message
from edged.clinical.conversation import ConversationPrompt, Message, conversation_messages
from edged.domain import Turn, TurnRole
from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.models import DEMO_MODEL, TINY_QWEN3_INT4
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.messages import decode_payload, parse_query

U, A = TurnRole.USER, TurnRole.ASSISTANT
SYSTEM = "You are a careful assistant."
VITALS = "The wearer's readings over the last 30 min (1 summaries):\n- SpO2: 97 %\nNEWS2 0."


def _query(history: Any, **fields: Any) -> Any:
    return parse_query({"id": "q1", "text": "And now?", "history": history, **fields})


def _error(obj: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_query(obj)
    return info.value


def _turns(*pairs: tuple[TurnRole, str]) -> tuple[Turn, ...]:
    return tuple(Turn(role, text) for role, text in pairs)


# -- validation ------------------------------------------------------------------------------


def test_a_query_carries_its_history_oldest_first() -> None:
    history = [
        {"role": "user", "text": "I feel dizzy."},
        {"role": "assistant", "text": "Sit down and drink some water."},
        {"role": "user", "text": "I did.", "ts": 5},  # unknown fields are ignored
    ]
    assert _query(history).history == _turns(
        (U, "I feel dizzy."), (A, "Sit down and drink some water."), (U, "I did.")
    )


@pytest.mark.parametrize("history", [None, []])
def test_no_history_null_or_empty(history: Any) -> None:
    assert _query(history).history == ()
    assert parse_query({"id": "q1", "text": "hi"}).history == ()


def test_sixteen_turns_of_four_thousand_characters_are_accepted() -> None:
    turns = [{"role": "user", "text": "x" * 4000}] * 16
    assert len(_query(turns).history) == 16


@pytest.mark.parametrize(
    "history, field, message",
    [
        ("hi", "history", "history must be an array of turns, got string"),
        ({"role": "user"}, "history", "history must be an array of turns, got object"),
        (
            [{"role": "user", "text": "a"}] * 17,
            "history",
            "history has 17 turns; the limit is 16",
        ),
        (["hi"], "history.0", "history.0 must be an object with role and text, got string"),
        ([None], "history.0", "history.0 must be an object with role and text, got null"),
        ([{"text": "a"}], "history.0.role", "history.0.role is required"),
        (
            [{"role": "system", "text": "a"}],
            "history.0.role",
            "history.0.role = 'system' is not one of user, assistant",
        ),
        (
            [{"role": 1, "text": "a"}],
            "history.0.role",
            "history.0.role must be a string, got number",
        ),
        ([{"role": "user"}], "history.0.text", "history.0.text is required"),
        (
            [{"role": "user", "text": ""}],
            "history.0.text",
            "history.0.text is empty; it must be 1..4000 characters",
        ),
        (
            [{"role": "user", "text": ["a"]}],
            "history.0.text",
            "history.0.text must be a string, got array",
        ),
        (
            [{"role": "user", "text": "x" * 4001}],
            "history.0.text",
            "history.0.text is 4001 characters; the limit is 4000",
        ),
        (
            [{"role": "user", "text": "a\ud800"}],
            "history.0.text",
            "history.0.text has an unpaired surrogate at character 1",
        ),
    ],
)
def test_a_bad_history_is_invalid_schema_naming_the_turn(
    history: Any, field: str, message: str
) -> None:
    err = _error({"id": "q1", "text": "hi", "history": history})
    assert err.payload() == {
        "id": "q1",
        "code": "invalid_schema",
        "message": message,
        "field": field,
        "retry_after_ms": None,
    }


def test_the_first_bad_turn_is_named() -> None:
    ok = {"role": "user", "text": "fine"}
    history = [ok, ok, ok, {"role": "assistant", "text": ""}, {"role": "robot", "text": "a"}]
    assert _error({"id": "q1", "text": "hi", "history": history}).field == "history.3.text"


def test_history_is_checked_after_text_and_before_max_tokens() -> None:
    bad = [{"role": "system", "text": "a"}]
    assert _error({"id": "q1", "text": "", "history": bad}).field == "text"
    both = {"id": "q1", "text": "hi", "history": bad, "max_tokens": 0}
    assert _error(both).field == "history.0.role"


def test_history_errors_never_contain_the_patients_words() -> None:
    secret = "my HIV status is "
    for text in (secret * 300, secret + "\ud800", ""):
        err = _error({"id": "q1", "text": "hi", "history": [{"role": "user", "text": text}]})
        assert "HIV" not in json.dumps(err.payload())


def test_the_whole_message_keeps_the_16_kib_limit() -> None:
    turns = [{"role": "user", "text": "x" * 3000}] * 6
    payload = json.dumps({"id": "q1", "text": "hi", "history": turns}).encode()
    with pytest.raises(ProtocolError) as info:
        decode_payload(payload)
    assert info.value.code == ErrorCode.TOO_LARGE


# -- the prompt ------------------------------------------------------------------------------


def _words(messages: Sequence[Message]) -> int:
    """A stand-in for the chat template: a word per token, two tokens of framing per message."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def _build(
    history: Sequence[Turn], budget: int = 10_000, vitals: str | None = VITALS
) -> ConversationPrompt:
    return conversation_messages(SYSTEM, history, "And now?", vitals, _words, budget)


def _contents(prompt: ConversationPrompt) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in prompt.messages]


def test_without_history_the_prompt_is_the_grounded_question_and_nothing_is_counted() -> None:
    def never(messages: Sequence[Message]) -> int:
        raise AssertionError("counted a prompt without history")

    prompt = conversation_messages(SYSTEM, (), "And now?", VITALS, never, 0)
    assert _contents(prompt) == [("system", SYSTEM), ("user", user_message("And now?", VITALS))]
    assert prompt.history_turns == 0


def test_system_prompt_then_vitals_then_the_conversation_then_the_question() -> None:
    history = _turns((U, "I feel dizzy."), (A, "Sit down."), (U, "Done."), (A, "Good."))
    prompt = _build(history)
    assert prompt.history_turns == 4
    assert _contents(prompt) == [
        ("system", SYSTEM),
        ("user", f"{VITALS}\n\nQuestion: I feel dizzy."),
        ("assistant", "Sit down."),
        ("user", "Done."),
        ("assistant", "Good."),
        ("user", "And now?"),
    ]


def test_without_vitals_the_turns_are_as_sent() -> None:
    history = _turns((U, "I feel dizzy."), (A, "Sit down."))
    assert _contents(_build(history, vitals=None))[1:] == [
        ("user", "I feel dizzy."),
        ("assistant", "Sit down."),
        ("user", "And now?"),
    ]


def test_the_oldest_turns_are_dropped_first_and_the_vitals_move_to_the_first_kept() -> None:
    history = _turns((U, "one " * 50), (A, "two " * 50), (U, "three"), (A, "four"))
    full = _words(_build(history).messages)
    prompt = _build(history, budget=full - 1)
    assert prompt.history_turns == 2
    assert _contents(prompt)[1:] == [
        ("user", f"{VITALS}\n\nQuestion: three"),
        ("assistant", "four"),
        ("user", "And now?"),
    ]
    assert _build(history, budget=full).history_turns == 4  # the budget is inclusive


def test_an_assistant_turn_left_first_is_dropped_too() -> None:
    # Dropping the long first turn alone would leave the assistant's reply to lead.
    history = _turns((U, "one " * 50), (A, "two"), (U, "three"), (A, "four"))
    full = _words(_build(history).messages)
    prompt = _build(history, budget=full - 1)
    assert prompt.history_turns == 2
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "user"]


def test_when_no_turn_fits_the_question_is_asked_alone() -> None:
    history = _turns((U, "one " * 50), (A, "two " * 50))
    prompt = _build(history, budget=1)
    assert prompt.history_turns == 0
    assert _contents(prompt) == [("system", SYSTEM), ("user", user_message("And now?", VITALS))]


def test_a_history_of_assistant_turns_only_is_not_used() -> None:
    prompt = _build(_turns((A, "Hello, how can I help?")))
    assert prompt.history_turns == 0 and len(prompt.messages) == 2


def test_consecutive_turns_of_one_role_are_kept_as_sent() -> None:
    history = _turns(
        (U, "I fell."), (U, "My wrist hurts."), (A, "Can you move it?"), (A, "Ice it.")
    )
    prompt = _build(history)
    assert prompt.history_turns == 4
    assert [m["role"] for m in prompt.messages] == [
        "system",
        "user",
        "user",
        "assistant",
        "assistant",
        "user",
    ]


_histories = st.lists(
    st.tuples(st.sampled_from([U, A]), st.integers(1, 40)).map(lambda t: Turn(t[0], "w " * t[1])),
    max_size=16,
)


@given(_histories, st.integers(0, 400))
def test_the_kept_turns_are_the_longest_fitting_suffix_that_starts_with_the_user(
    history: list[Turn], budget: int
) -> None:
    prompt = _build(history, budget=budget)
    kept = len(history) - prompt.history_turns
    fitting = [
        start
        for start in range(len(history))
        if history[start].role == U and _words(_build(history[start:]).messages) <= budget
    ]
    assert kept == min(fitting, default=len(history))


# -- through the bundled models --------------------------------------------------------------


@pytest.mark.parametrize("model", [TINY_QWEN3_INT4, DEMO_MODEL], ids=lambda p: p.name)
def test_a_conversation_renders_and_generates_with_the_bundled_models(model: Path) -> None:
    engine = Engine.load(model, EngineOptions(threads=1, context_length=1024))
    cached = engine.set_system_prompt(SYSTEM)
    history = _turns(
        (U, "I fell this morning."),
        (U, "My wrist hurts."),  # two user turns in a row, as the wire format allows
        (A, "Can you move your fingers?"),
        (A, "If not, see a doctor today."),
        (U, "I can move them."),
    )

    def count(messages: Sequence[Message]) -> int:
        return engine.count_chat_tokens(messages, enable_thinking=False)

    prompt = conversation_messages(SYSTEM, history, "Should I still go?", VITALS, count, 1000)
    assert prompt.history_turns == 5
    rendered = engine.tokenizer.decode(
        engine.render_chat(prompt.messages, enable_thinking=False), skip_special_tokens=False
    )
    order = [SYSTEM, VITALS, "I fell", "My wrist", "Can you move", "If not", "I can", "Should I"]
    places = [rendered.index(piece) for piece in order]
    assert places == sorted(places), rendered
    result = engine.chat(prompt.messages, GenerationConfig(max_new_tokens=8), enable_thinking=False)
    assert result.prompt_tokens == count(prompt.messages)
    assert result.cached_tokens == cached  # the system prompt's KV still serves the chat
    assert result.completion_tokens >= 1
