"""A query's chat as the model reads it: the system prompt, the vitals block, the earlier turns
that fit, then the question (API.md v1.1, conversation history).

The system prompt is the first message, alone, so the KV cached for it (the engine's prefix
cache) serves a conversation as it serves a single question. The vitals block leads the first
user turn kept, so the model reads the wearer's state before the conversation, as it does before
a single question. Turns that do not fit the token budget go oldest-first: the newest ones are
what the question refers to. A remainder that would start with an assistant turn loses that turn
too, because chat templates (and the models trained on them) expect the user to speak first
after the system prompt. Consecutive turns of one role are kept as sent.

Nothing here is kept: the client sends the history with every query.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edged.clinical.advice import user_message
from edged.domain import Turn, TurnRole

Message = dict[str, str]
PromptCounter = Callable[[Sequence[Message]], int]
"""Tokens a message list renders to through the model's chat template (generation prompt
included): what the model will prefill."""


@dataclass(frozen=True)
class ConversationPrompt:
    messages: tuple[Message, ...]
    history_turns: int
    """Earlier turns the messages hold: the newest ones of the history (API.md
    `usage.history_turns`)."""


def conversation_messages(
    system_prompt: str,
    history: Sequence[Turn],
    question: str,
    vitals: str | None,
    count_prompt: PromptCounter,
    budget: int,
) -> ConversationPrompt:
    """The messages for `question` after `history` (oldest first), with the `vitals` block
    (None: without one) leading the first user turn, keeping the most recent turns whose
    rendering fits `budget` tokens.

    The question itself is never dropped: without any history the messages are the system
    prompt and the grounded question, whatever their size (the engine then decides whether
    they fit its context). `count_prompt` is not called when there is no history.
    """
    # Where the kept history may start: at a user turn, or nowhere (no history at all).
    starts = [i for i, turn in enumerate(history) if turn.role == TurnRole.USER]
    starts.append(len(history))

    def build(start: int) -> list[Message]:
        return _messages(system_prompt, history[start:], question, vitals)

    def fits(start: int) -> bool:
        return start == len(history) or count_prompt(build(start)) <= budget

    # Dropping turns only ever shortens the prompt, so the starts that fit are a suffix of
    # `starts`: a binary search finds the first in a few renderings, not one per turn.
    start = starts[bisect_left(starts, True, key=fits)]
    return ConversationPrompt(tuple(build(start)), len(history) - start)


def _messages(
    system_prompt: str, turns: Sequence[Turn], question: str, vitals: str | None
) -> list[Message]:
    messages = [{"role": "system", "content": system_prompt}]
    if not turns:
        messages.append({"role": "user", "content": user_message(question, vitals)})
        return messages
    # The first turn reads as the daemon would have asked it alone: block, then "Question:".
    first, *rest = turns
    messages.append({"role": first.role.value, "content": user_message(first.text, vitals)})
    messages += [{"role": turn.role.value, "content": turn.text} for turn in rest]
    messages.append({"role": "user", "content": question})
    return messages
