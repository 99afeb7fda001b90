"""Draft tokens for speculative decoding without a second model: prompt lookup.

A grounded answer copies much of its prompt: the vitals block's lines ("SpO2: 89 % now,
lowest 88 %"), the triage line, and edged's fixed sentences (the escalation, the disclaimer).
When the last few tokens written also occur earlier (in the prompt, in the answer so far, in
one of the fixed phrases or in a recent answer), the tokens that followed them there are a
cheap guess at what comes next. The model then checks a whole guess in one forward pass:
every token it agrees with is a token gained for the price of that one pass (the weights are
read once for all positions, and on a memory-bound board that read is the step's cost).

Everything here is pure bookkeeping over token ids, tested without a model: `NgramCounts`
counts what followed each n-gram, `PromptLookup` proposes by a vote over those counts,
`DraftLength` decides how far to guess from how the last guesses fared.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftSettings:
    max_ngram: int = 4
    """Longest suffix looked up; a longer match is a more specific, safer guess."""
    min_ngram: int = 2
    """Shortest suffix looked up. Not one token: a single repeated token is a poor guess (on
    the demo model's first 30 held-out answers, 21 % of drafts after a one-token match in the
    text had their first token accepted, against 80 % after a 2-4 token match), and its misses
    shrink the next draft and bring on the cooldown, which then costs the good drafts that
    follow. Two tokens: 13 % more tokens per verification pass on 120 other held-out
    answers (questions 30-149: 1.89 -> 2.14; tools/README.md, "Draft policy")."""
    min_share: float = 0.7
    """Draft a token only when at least this share of the earlier occurrences of the longest
    match agree on it, and stop the draft at the first token where they do not: where the
    text, the phrases and the recent answers continued a match differently, any one guess is
    a coin toss, and a rejected row costs nearly a step on a small model (README, "Speculative
    decoding"). 0.7, against taking the most recent occurrence: 2.38 -> 2.64 tokens per pass
    and acceptance 0.68 -> 0.77 on held-out questions 30-149 (tools/README.md, "Draft
    policy")."""
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
    They are counted together (`AnswerWindow`): about 250 bytes per token of the demo model's
    answers, 340 of random tokens (16 MedPsy answers with their reasoning, 1,110 tokens each:
    about 6 MB). 16, not 8: 2.14 -> 2.38 tokens per pass on the demo model's held-out answers
    (tools/README.md, "Draft policy")."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"min_ngram = {self.min_ngram} must be between 1 and max_ngram = {self.max_ngram}"
            )
        if not 0 < self.min_share <= 1:
            raise ValueError(f"min_share = {self.min_share} must be above 0 and at most 1")
        if self.max_draft < 1:
            raise ValueError(f"max_draft = {self.max_draft} must be >= 1")
        if self.recent_answers < 0:
            raise ValueError(f"recent_answers = {self.recent_answers} must be >= 0")
        if self.cooldown_steps < 0 or self.misses_to_cool < 1:
            raise ValueError(
                f"cooldown_steps = {self.cooldown_steps} must be >= 0 and misses_to_cool = "
                f"{self.misses_to_cool} >= 1"
            )


Followers = int | dict[int, int]
"""What followed an n-gram: the token itself when it was seen once (most n-grams of an answer
occur once, and a dict per n-gram tripled the window's memory: 1,011 against 340 bytes per
token of 16 random 1,110-token answers), else {token: times seen}."""


class NgramCounts:
    """How often each token followed each n-gram (of `min_ngram` to `max_ngram` tokens) in
    the sequences counted; sequences can be taken out again."""

    def __init__(self, settings: DraftSettings) -> None:
        self._lengths = range(settings.min_ngram, settings.max_ngram + 1)
        self.table: dict[tuple[int, ...], Followers] = {}

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Count the n-grams ending at positions `start` to the one before the last (the
        last has no token after it yet)."""
        for key, after in self._ngrams(tokens, start):
            seen = self.table.get(key)
            if seen is None:
                self.table[key] = after
            elif isinstance(seen, int):
                self.table[key] = {seen: 2} if seen == after else {seen: 1, after: 1}
            else:
                seen[after] = seen.get(after, 0) + 1

    def remove(self, tokens: Sequence[int]) -> None:
        """Take out a sequence added before, whole (the table is then as if it never was)."""
        for key, after in self._ngrams(tokens, 0):
            seen = self.table[key]
            if isinstance(seen, int):
                del self.table[key]
                continue
            if seen[after] > 1:
                seen[after] -= 1
            else:
                del seen[after]
            if len(seen) == 1:
                ((token, times),) = seen.items()
                if times == 1:
                    self.table[key] = token

    def _ngrams(self, tokens: Sequence[int], start: int) -> Iterator[tuple[tuple[int, ...], int]]:
        for j in range(start, len(tokens) - 1):
            after = tokens[j + 1]
            for n in self._lengths:
                if j + 1 < n:
                    break
                yield tuple(tokens[j + 1 - n : j + 1]), after


def phrase_counts(phrases: Iterable[Sequence[int]], settings: DraftSettings) -> NgramCounts:
    """Fixed phrases counted together, once, and shared by every generation drafting from
    them."""
    counts = NgramCounts(settings)
    for phrase in phrases:
        counts.add(phrase)
    return counts


class AnswerWindow:
    """The latest `recent_answers` answers, counted together to draft from."""

    def __init__(self, settings: DraftSettings) -> None:
        self.counts = NgramCounts(settings)
        self._answers: deque[tuple[int, ...]] = deque(maxlen=settings.recent_answers)
        self._added = False
        """Whether the latest `add` kept its answer (`forget_last` takes it out again)."""
        self._pushed_out: tuple[int, ...] | None = None
        """The answer the latest `add` pushed out of the full window (`forget_last` puts it
        back)."""

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, tokens: Sequence[int]) -> None:
        self._added, self._pushed_out = False, None
        if not self._answers.maxlen or len(tokens) < 2:
            return  # nothing to count: a one-token answer has no n-gram followed by a token
        if len(self._answers) == self._answers.maxlen:
            self._pushed_out = self._answers.popleft()
            self.counts.remove(self._pushed_out)
        answer = tuple(tokens)
        self._answers.append(answer)
        self.counts.add(answer)
        self._added = True

    def forget_last(self) -> None:
        """Undo the latest `add` whole: with the window full it pushed the oldest out."""
        if self._added:
            self.counts.remove(self._answers.pop())
        if self._pushed_out is not None:
            self._answers.appendleft(self._pushed_out)
            self.counts.add(self._pushed_out)
        self._added, self._pushed_out = False, None


class PromptLookup:
    """Proposes what followed the text's last tokens where they occurred before.

    The text is the prompt followed by everything generated; `sources` are more counted text
    the answer often copies (edged's escalation sentences and disclaimer, recent answers). At
    each drafted position the longest n-gram ending there that occurred before decides: the
    token that followed it most often in the text and the sources together is drafted if it
    has `min_share` of the votes, and the draft goes on from it; otherwise the draft ends."""

    def __init__(
        self,
        prompt: Sequence[int],
        sources: Sequence[NgramCounts] = (),
        settings: DraftSettings | None = None,
    ) -> None:
        self.settings = settings or DraftSettings()
        self._tokens = list(prompt)
        self._text = NgramCounts(self.settings)
        self._counted = 0
        """n-grams ending before this position of the text are counted."""
        self._tables = [self._text.table] + [source.table for source in sources]

    def append(self, token: int) -> None:
        self._tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that may follow the text; [] when nothing matches."""
        if limit < 1:
            return []
        tokens = self._tokens
        # Only n-grams with a token after them: the text's own last n-gram never matches itself.
        self._text.add(tokens, self._counted)
        self._counted = max(self._counted, len(tokens) - 1)
        context = tokens[-self.settings.max_ngram :]
        drafts: list[int] = []
        while len(drafts) < limit:
            token = self._vote(context)
            if token is None:
                break
            drafts.append(token)
            context.append(token)
        return drafts

    def _vote(self, context: list[int]) -> int | None:
        """The token the longest earlier match of `context`'s end was followed by, if enough
        of its occurrences agree on it."""
        settings = self.settings
        for n in range(min(settings.max_ngram, len(context)), settings.min_ngram - 1, -1):
            key = tuple(context[-n:])
            votes: Followers | None = None
            for table in self._tables:
                seen = table.get(key)
                if seen is None:
                    continue
                votes = seen if votes is None else _summed(votes, seen)
            if votes is None:
                continue
            if isinstance(votes, int):
                return votes  # one token seen once: all the votes there are
            top = max(votes.values())
            if top < settings.min_share * sum(votes.values()):
                return None
            # A tie (possible with min_share <= 0.5) goes to the lowest id, not to whichever
            # source happened to count its token first.
            return min(token for token, times in votes.items() if times == top)
        return None


def _summed(votes: Followers, seen: Followers) -> dict[int, int]:
    """Two sources' followers of one n-gram added up, in a new dict (never into a table's)."""
    total = {votes: 1} if isinstance(votes, int) else dict(votes)
    for token, times in ({seen: 1} if isinstance(seen, int) else seen).items():
        total[token] = total.get(token, 0) + times
    return total


def draft_room(capacity: int, cached: int, max_new: int, generated: int) -> int:
    """Most tokens a draft may hold: a verification pass runs the token just chosen and its
    drafts, which must fit in the KV cache (`capacity`, `cached` positions held) and in the
    answer's cap (`max_new`, `generated` so far)."""
    return min(capacity - cached - 1, max_new - generated - 1)


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
