"""Draft tokens for speculative decoding without a second model: prompt lookup.

A grounded answer copies much of its prompt: the vitals block's lines ("SpO2: 89 % now,
lowest 88 %"), the triage line, and edged's fixed sentences (the escalation, the disclaimer).
When the last few tokens written also occur earlier (in the prompt, in the answer so far, or in
one of the fixed phrases), the tokens that followed them there are a cheap guess at what comes
next. The model then checks a whole guess in one forward pass: every token it agrees with is
a token gained for the price of that one pass (the weights are read once for all positions,
and on a memory-bound board that read is the step's cost).

Everything here is pure bookkeeping over token ids, tested without a model: `PromptLookup`
proposes, `DraftLength` decides how far to guess from how the last guesses fared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftSettings:
    max_ngram: int = 4
    """Longest suffix looked up; a longer match is a more specific, safer guess."""
    min_ngram: int = 2
    """Shortest suffix looked up. Not one token: a single repeated token is a poor guess (on
    the demo model's first 30 held-out answers, 21 % of drafts after a one-token match in the text
    had their first token accepted, against 80 % after a 2-4 token match), and its misses
    shrink the next draft and bring on the cooldown, which then costs the good drafts that
    follow. Two tokens: 13 % more tokens per verification pass on 120 other held-out
    answers (questions 30-149: 1.89 -> 2.14; tools/README.md, "Draft policy")."""
    max_draft: int = 8
    """Most tokens drafted for one verification pass."""
    cooldown_steps: int = 16
    """Plain decode steps after `misses_to_cool` drafts in a row had no token accepted, before
    drafting again: open-ended text, where guesses fail, pays for almost none."""
    misses_to_cool: int = 3
    recent_answers: int = 16
    """Earlier answers (any wearer's) kept in memory to draft from: a model answers alike
    questions alike, in its own phrases. Drafts never reach an answer unless the model itself
    writes the same tokens, so nothing of one answer can appear in another through them.
    Each costs about 300 bytes per token of its index (1,110 tokens, a MedPsy answer with its
    reasoning: 0.3 MB). 16, not 8: 2.14 -> 2.38 tokens per pass on the demo model's held-out
    answers (tools/README.md, "Draft policy")."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"min_ngram = {self.min_ngram} must be between 1 and max_ngram = {self.max_ngram}"
            )
        if self.max_draft < 1:
            raise ValueError(f"max_draft = {self.max_draft} must be >= 1")
        if self.recent_answers < 0:
            raise ValueError(f"recent_answers = {self.recent_answers} must be >= 0")
        if self.cooldown_steps < 0 or self.misses_to_cool < 1:
            raise ValueError(
                f"cooldown_steps = {self.cooldown_steps} must be >= 0 and misses_to_cool = "
                f"{self.misses_to_cool} >= 1"
            )


class NgramIndex:
    """Where each n-gram of one token sequence last ended, kept up to date as it grows."""

    def __init__(self, settings: DraftSettings) -> None:
        self._lengths = range(settings.min_ngram, settings.max_ngram + 1)
        self._last_end: dict[tuple[int, ...], int] = {}
        self.tokens: list[int] = []
        self._indexed = 0
        """n-grams ending before this position are in the index."""

    def extend(self, tokens: Iterable[int]) -> None:
        self.tokens.extend(tokens)

    def index_until(self, end: int) -> None:
        """Index the n-grams ending at positions below `end` (later ones win: most recent)."""
        tokens = self.tokens
        for j in range(self._indexed, end):
            for n in self._lengths:
                if j + 1 >= n:
                    self._last_end[tuple(tokens[j + 1 - n : j + 1])] = j
        self._indexed = max(self._indexed, end)

    def following(self, key: tuple[int, ...], limit: int) -> list[int]:
        j = self._last_end.get(key)
        return [] if j is None else self.tokens[j + 1 : j + 1 + limit]


class PromptLookup:
    """Proposes the continuation of the longest earlier match of the text's last tokens.

    The text is the prompt followed by everything generated; `phrases` are token sequences
    the answer often contains verbatim (edged's escalation sentences, disclaimer). A match in
    the text is preferred to one in the phrases at the same length (it is about this wearer)."""

    def __init__(
        self,
        prompt: Sequence[int],
        phrases: Sequence[Sequence[int] | NgramIndex] = (),
        settings: DraftSettings | None = None,
    ) -> None:
        self.settings = settings or DraftSettings()
        self._text = NgramIndex(self.settings)
        self._text.extend(prompt)
        self._phrases = [
            p if isinstance(p, NgramIndex) else phrase_index(p, self.settings) for p in phrases
        ]

    def append(self, token: int) -> None:
        self._text.extend((token,))

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that may follow the text; [] when nothing matches."""
        if limit < 1:
            return []
        text = self._text
        # The text's own last n-gram must not match itself: index up to the one before it.
        text.index_until(len(text.tokens) - 1)
        tokens = text.tokens
        for n in range(self.settings.max_ngram, self.settings.min_ngram - 1, -1):
            if len(tokens) < n:
                continue
            key = tuple(tokens[-n:])
            found = text.following(key, limit)
            if found:
                return found
            for phrase in self._phrases:
                found = phrase.following(key, limit)
                if found:
                    return found
        return []


def draft_room(capacity: int, cached: int, max_new: int, generated: int) -> int:
    """Most tokens a draft may hold: a verification pass runs the token just chosen and its
    drafts, which must fit in the KV cache (`capacity`, `cached` positions held) and in the
    answer's cap (`max_new`, `generated` so far)."""
    return min(capacity - cached - 1, max_new - generated - 1)


def phrase_index(tokens: Sequence[int], settings: DraftSettings) -> NgramIndex:
    """A fixed phrase's index, built once and shared by every generation that drafts from it."""
    index = NgramIndex(settings)
    index.extend(tokens)
    index.index_until(len(tokens))
    return index


@dataclass
class DraftLength:
    """How many tokens to draft next, from how the last drafts fared.

    Grows by one after a draft accepted whole, shrinks to one more than what was accepted
    otherwise; after `misses_to_cool` drafts in a row with nothing accepted, drafting pauses
    for `cooldown_steps` plain steps (each miss costs a wider forward pass for no token)."""

    settings: DraftSettings
    length: int = 4
    misses: int = 0
    cooldown: int = 0

    def __post_init__(self) -> None:
        self.length = min(self.length, self.settings.max_draft)

    def allowance(self) -> int:
        """Tokens to draft at this step (0: a plain step, cooling down)."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return 0
        return self.length

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.length = min(self.settings.max_draft, self.length + 1)
        else:
            self.length = max(1, accepted + 1)
        if accepted > 0:
            self.misses = 0
            return
        self.misses += 1
        if self.misses >= self.settings.misses_to_cool:
            self.misses = 0
            self.cooldown = self.settings.cooldown_steps


@dataclass
class DraftStats:
    """What speculation did in one generation (the result's `speculation`)."""

    passes: int = 0
    """Forward passes in the decode loop (plain and verifying)."""
    drafted: int = 0
    accepted: int = 0
    trace: list[tuple[int, int]] | None = None
    """(drafted, accepted) per decode pass, (0, 0) for a plain one, when asked for: a
    benchmark replays it through another model of the same shape of work."""

    def record(self, drafted: int, accepted: int) -> None:
        self.passes += 1
        self.drafted += drafted
        self.accepted += accepted
        if self.trace is not None:
            self.trace.append((drafted, accepted))

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None
