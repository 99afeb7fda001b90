"""The decode loop: prefill, then one token at a time until EOS, a stop string, the token cap,
or the caller says stop; with speculation, a pass may check several drafted tokens at once.

Everything stateful (session, KV cache) lives in the runner; this module owns the order of
events within one generation and what the caller sees: answer text deltas (never the
reasoning block), a finish reason and timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edged.domain import FinishReason
from edged.engine.draft import (
    DraftLength,
    DraftSettings,
    DraftStats,
    NgramCounts,
    PromptLookup,
    draft_room,
)
from edged.engine.runner import ContextFullError, GrowingKVRunner, KVSnapshot, SharedKVRunner
from edged.engine.sampling import SamplingParams, select_token
from edged.engine.text import ReasoningState, find_stop, holdback
from edged.engine.tokenizer import ChatTokenizer, IncrementalDecoder

TextCallback = Callable[[str], None]
StopCheck = Callable[[], "str | None"]
StepHook = Callable[[int], None]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Seed of the sampler; None draws fresh entropy. Unused when greedy."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the stop string itself is not returned."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks only)."""
    reasoning_budget: int | None = None
    """Tokens a thinking model may spend inside <think>…</think> before the block is closed
    for it and it must answer; None = unlimited, 0 = close the block at once."""
    max_context: int | None = None
    """Prompt plus answer may not exceed this many tokens, below the engine's context_length:
    the governor's cap while memory is tight (a growing KV cache then stays small).
    None = context_length."""
    speculate: bool = True
    """Draft tokens by prompt lookup and verify them in one pass, where the engine has
    speculation on and the graph can return logits for several positions. Greedy only: the
    tokens are exactly those of plain decoding; sampling always decodes one at a time."""
    trace_drafts: bool = False
    """Record (drafted, accepted) per decode pass in the result (benchmarks replay it)."""
    draft_phrases: tuple[str, ...] = ()
    """Sentences the answer may copy verbatim (the configured escalation sentences, the
    disclaimer): drafted from like the prompt."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens} must be >= 1")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context = {self.max_context} must be >= 2")
        if self.reasoning_budget is not None and self.reasoning_budget < 0:
            raise ValueError(f"reasoning_budget = {self.reasoning_budget} must be >= 0")
        _ = self.sampling  # constructing SamplingParams validates the sampling fields

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


@dataclass(frozen=True)
class Timing:
    prefill_ms: float
    first_token_ms: float | None
    total_ms: float
    prefill_tps: float | None
    """Prompt tokens per second actually computed (cached ones excluded)."""
    decode_tps: float | None
    """Tokens per second after the first one."""


@dataclass(frozen=True)
class GenerationResult:
    text: str
    """The answer: reasoning block stripped, stop string cut, leading whitespace removed."""
    reasoning: str
    finish_reason: str
    """`stop`, `length`, or what the caller's stop check returned (`cancelled`, `deadline`)."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    token_ids: tuple[int, ...] = field(repr=False)
    timing: Timing
    speculation: DraftStats | None = field(default=None, repr=False)
    """What speculative decoding did, when it ran."""


@dataclass(frozen=True)
class Speculation:
    """The engine's drafting setup for one generation: settings, and counts of text the
    answer may copy besides its prompt (edged's own sentences, earlier answers)."""

    settings: DraftSettings
    sources: tuple[NgramCounts, ...] = ()


@dataclass(frozen=True)
class PrefixEntry:
    token_ids: tuple[int, ...]
    kv: KVSnapshot


class _AnswerStream:
    """Answer text as the client sees it: leading whitespace dropped, stop strings held back."""

    def __init__(
        self, tokenizer: ChatTokenizer, stops: tuple[str, ...], on_text: TextCallback | None
    ) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = stops
        self._on_text = on_text
        self._raw = ""
        self._emitted = 0
        self.stopped = False

    @property
    def visible(self) -> str:
        return self._raw.lstrip()

    def push(self, token_id: int) -> None:
        self._add(self._decoder.push(token_id), final=False)

    def finish(self) -> str:
        if not self.stopped:
            self._add(self._decoder.flush(), final=True)
        return self.visible

    def _add(self, piece: str, final: bool) -> None:
        self._raw += piece
        text = self.visible
        cut = find_stop(text, self._stops)
        if cut is not None:
            self._raw, self.stopped = text[:cut], True
            text, final = self._raw, True
        safe = len(text) if final else len(text) - holdback(text, self._stops)
        if safe > self._emitted:
            if self._on_text is not None:
                self._on_text(text[self._emitted : safe])
            self._emitted = safe


def run_generation(
    runner: GrowingKVRunner | SharedKVRunner,
    tokenizer: ChatTokenizer,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    *,
    eos_ids: frozenset[int],
    think_ids: tuple[int | None, int | None],
    prefix: PrefixEntry | None,
    prefill_chunk: int,
    on_text: TextCallback | None = None,
    stop_check: StopCheck | None = None,
    between_steps: StepHook | None = None,
    speculation: Speculation | None = None,
) -> GenerationResult:
    started = time.perf_counter()
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty")
    runner.reset()
    cached = _restore_prefix(runner, prompt, prefix)
    limit = _context_limit(runner.capacity, len(prompt), config.max_context)
    if limit < runner.capacity and isinstance(runner, SharedKVRunner):
        # Capped (the governor, memory tight): what earlier, longer answers wrote beyond the
        # cap is given back, not just left unwritten.
        runner.release(limit)

    reason = stop_check() if stop_check else None
    if reason is not None:
        return _result("", "", reason, prompt, cached, [], started, started, None, None)

    logits = prefill(runner, prompt[cached:], prefill_chunk)
    prefill_end = time.perf_counter()
    loop = _DecodeLoop(tokenizer, config, prompt, eos_ids, think_ids, on_text)
    if _can_speculate(runner, config, speculation):
        assert speculation is not None
        loop.enable_drafts(prompt, speculation, config.trace_drafts)
    max_new = min(config.max_new_tokens, limit - len(prompt))
    finish = loop.run(runner, logits, max_new, stop_check, between_steps)
    return _result(
        loop.answer.finish(),
        tokenizer.decode(loop.reasoning_ids).strip(),
        finish,
        prompt,
        cached,
        loop.generated,
        started,
        prefill_end,
        loop.first_token_at,
        time.perf_counter(),
        loop.stats,
    )


def _can_speculate(
    runner: GrowingKVRunner | SharedKVRunner,
    config: GenerationConfig,
    speculation: Speculation | None,
) -> bool:
    """Drafting needs the engine's setup, a greedy request that allows it, and a runner that
    can check several positions in one pass and rewind (the in-place KV buffer's)."""
    return (
        speculation is not None
        and config.speculate
        and config.sampling.greedy
        and isinstance(runner, SharedKVRunner)
        and runner.can_verify
    )


def _restore_prefix(
    runner: GrowingKVRunner | SharedKVRunner, prompt: list[int], prefix: PrefixEntry | None
) -> int:
    """Restore the cached prefix's KV when the prompt starts with it; the tokens it covers."""
    if (
        prefix is not None
        and len(prompt) > len(prefix.token_ids)
        and tuple(prompt[: len(prefix.token_ids)]) == prefix.token_ids
    ):
        runner.restore(prefix.kv)
        return len(prefix.token_ids)
    return 0


def _context_limit(capacity: int, prompt_tokens: int, max_context: int | None) -> int:
    """Tokens prompt plus answer may take; ContextFullError when the prompt leaves no room."""
    limit = capacity if max_context is None else min(capacity, max_context)
    if prompt_tokens >= limit:
        capped = limit < capacity
        where = (
            f"the memory cap of {limit} tokens (context_length {capacity})"
            if capped
            else f"context_length = {limit}"
        )
        raise ContextFullError(
            f"prompt of {prompt_tokens} tokens leaves no room to answer within {where}",
            capped=capped,
        )
    return limit


class _DecodeLoop:
    """One generation's token-by-token state: sampling, the reasoning block, the answer."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        config: GenerationConfig,
        prompt: list[int],
        eos_ids: frozenset[int],
        think_ids: tuple[int | None, int | None],
        on_text: TextCallback | None,
    ) -> None:
        self._sampling = config.sampling
        self._rng = np.random.default_rng(config.seed)
        self._context = list(prompt)
        self._eos = frozenset() if config.ignore_eos else eos_ids
        self._reasoning = ReasoningState.after_prompt(prompt, *think_ids, config.reasoning_budget)
        self._close_block = _close_block_ids(tokenizer, think_ids[1])
        self._forced: list[int] = []
        self.answer = _AnswerStream(tokenizer, config.stop, on_text)
        self.reasoning_ids: list[int] = []
        self.generated: list[int] = []
        self.first_token_at: float | None = None
        self._lookup: PromptLookup | None = None
        self._draft_length: DraftLength | None = None
        self.stats: DraftStats | None = None

    def enable_drafts(self, prompt: list[int], speculation: Speculation, trace: bool) -> None:
        settings = speculation.settings
        self._lookup = PromptLookup(prompt, speculation.sources, settings)
        self._draft_length = DraftLength(settings)
        self.stats = DraftStats(trace=[] if trace else None)

    def run(
        self,
        runner: GrowingKVRunner | SharedKVRunner,
        logits: np.ndarray,
        max_new: int,
        stop_check: StopCheck | None,
        between_steps: StepHook | None,
    ) -> str:
        """Decode until EOS, a stop string, `max_new` tokens or the caller's stop; the reason.

        Every token, drafted or not, goes through the same choice (`_next_token` on the logits
        that precede it) and the same checks, in order: speculation changes how many tokens
        one forward pass yields, never which tokens, nor when streaming, a stop string, the
        reasoning budget, a cancel or a deadline takes effect."""
        chosen: int | None = None  # picked already, from a verification pass's logits
        while True:
            token = chosen if chosen is not None else self._next_token(logits)
            finish = self._take(token, max_new, stop_check)
            if finish is not None:
                return finish
            if between_steps is not None:
                between_steps(len(self.generated))
            drafts = self._drafts(runner, max_new)
            if not drafts:
                logits, chosen = runner.forward([token]), None
                if self.stats is not None:
                    self.stats.record(0, 0)
                continue
            finish, logits, chosen = self._verify(runner, token, drafts, max_new, stop_check)
            if finish is not None:
                return finish

    def _take(self, token: int, max_new: int, stop_check: StopCheck | None) -> str | None:
        """Accept `token`; the finish reason if the generation ends with it."""
        if self._accept(token):
            return FinishReason.STOP
        if len(self.generated) >= max_new:
            return FinishReason.LENGTH
        return stop_check() if stop_check else None

    def _drafts(self, runner: GrowingKVRunner | SharedKVRunner, max_new: int) -> list[int]:
        if self._lookup is None or self._draft_length is None:
            return []
        room = draft_room(runner.capacity, runner.length, max_new, len(self.generated))
        if room < 1:
            return []
        return self._lookup.propose(min(room, self._draft_length.allowance()))

    def _verify(
        self,
        runner: GrowingKVRunner | SharedKVRunner,
        token: int,
        drafts: list[int],
        max_new: int,
        stop_check: StopCheck | None,
    ) -> tuple[str | None, np.ndarray, int | None]:
        """Run `token` and `drafts` in one pass and take the drafts the model agrees with, in
        order. Returns (finish reason or None, the logits after the last token kept, or the
        next token already chosen where a draft was rejected)."""
        assert isinstance(runner, SharedKVRunner) and self._draft_length and self.stats
        base = runner.length
        rows = runner.verify([token, *drafts])
        accepted, finish, chosen = 0, None, None
        for i, draft in enumerate(drafts):
            choice = self._next_token(rows[i])
            if choice != draft:
                chosen = choice
                break
            accepted += 1
            finish = self._take(draft, max_new, stop_check)
            if finish is not None:
                break
        runner.rewind(base + 1 + accepted)
        self._draft_length.record(len(drafts), accepted)
        self.stats.record(len(drafts), accepted)
        return finish, rows[accepted], chosen

    def _next_token(self, logits: np.ndarray) -> int:
        if self._reasoning.over_budget and not self._forced:
            self._forced = list(self._close_block)
        if self._forced:
            return self._forced.pop(0)
        return select_token(logits, self._sampling, self._rng, self._context)

    def _accept(self, token: int) -> bool:
        """Record `token`; True when it ends the answer (EOS or a stop string)."""
        self.generated.append(token)
        self._context.append(token)
        if self._lookup is not None:
            self._lookup.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self._eos:
            return True
        was_inside = self._reasoning.inside
        self._reasoning.observe(token)
        if was_inside or self._reasoning.inside:
            if was_inside and self._reasoning.inside:
                self.reasoning_ids.append(token)
            return False
        self.answer.push(token)
        return self.answer.stopped


def prefill(runner: GrowingKVRunner | SharedKVRunner, ids: Sequence[int], chunk: int) -> np.ndarray:
    """Run `ids` into the runner's KV in chunks of `chunk` tokens; the last position's logits
    (a view of the runner's buffer). Chunking bounds the attention activations of a long prompt
    (they grow with n^2)."""
    logits = None
    for start in range(0, len(ids), chunk):
        logits = runner.forward(ids[start : start + chunk])
    assert logits is not None
    return logits


def _close_block_ids(tokenizer: ChatTokenizer, end_id: int | None) -> list[int]:
    """Tokens that end a reasoning block the way thinking models write it: newline, tag, blank."""
    if end_id is None:
        return []
    return [*tokenizer.encode("\n"), end_id, *tokenizer.encode("\n\n")]


def _result(
    text: str,
    reasoning: str,
    finish: str,
    prompt: list[int],
    cached: int,
    generated: list[int],
    started: float,
    prefill_end: float,
    first_token_at: float | None,
    ended: float | None,
    speculation: DraftStats | None = None,
) -> GenerationResult:
    ended = ended if ended is not None else time.perf_counter()
    prefill_s = prefill_end - started
    computed = len(prompt) - cached
    decode_s = ended - first_token_at if first_token_at is not None else 0.0
    return GenerationResult(
        text=text,
        reasoning=reasoning,
        finish_reason=finish,
        prompt_tokens=len(prompt),
        completion_tokens=len(generated),
        cached_tokens=cached,
        token_ids=tuple(generated),
        speculation=speculation,
        timing=Timing(
            prefill_ms=prefill_s * 1000,
            first_token_ms=(first_token_at - started) * 1000 if first_token_at else None,
            total_ms=(ended - started) * 1000,
            prefill_tps=computed / prefill_s if computed and prefill_s > 0 else None,
            decode_tps=(len(generated) - 1) / decode_s
            if len(generated) > 1 and decode_s > 0
            else None,
        ),
    )
