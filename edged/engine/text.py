"""Pure text policies of generation: stop strings and the reasoning (`<think>`) block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string.

    A streaming client must not see text that later turns out to be part of a stop string,
    or the streamed deltas would not add up to the final text.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass
class ReasoningState:
    """Tracks whether decoding is inside a `<think>` block and how many tokens it spent there.

    The token ids come from the model's manifest; None means the model has no reasoning tags.
    """

    start_id: int | None
    end_id: int | None
    budget: int | None
    """Tokens allowed inside the block before it is closed for the model; None = unlimited."""
    inside: bool = False
    spent: int = 0

    @classmethod
    def after_prompt(
        cls, prompt_ids: Sequence[int], start_id: int | None, end_id: int | None, budget: int | None
    ) -> ReasoningState:
        """A prompt that ends inside an open `<think>` (templates may open it) starts inside."""
        state = cls(start_id, end_id, budget)
        if start_id is not None and end_id is not None:
            last_start = max((i for i, t in enumerate(prompt_ids) if t == start_id), default=-1)
            last_end = max((i for i, t in enumerate(prompt_ids) if t == end_id), default=-1)
            state.inside = last_start > last_end
        return state

    def observe(self, token_id: int) -> None:
        if self.start_id is None:
            return
        if token_id == self.start_id:
            self.inside, self.spent = True, 0
        elif token_id == self.end_id:
            self.inside = False
        elif self.inside:
            self.spent += 1

    @property
    def over_budget(self) -> bool:
        return self.inside and self.budget is not None and self.spent >= self.budget
