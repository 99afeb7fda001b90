"""Speculative decoding by prompt lookup: the same tokens as plain greedy decoding, fewer
forward passes where the answer copies its prompt, and every per-token behaviour (streaming,
stop strings, the token cap, cancel, the reasoning budget) exactly as without it. Real
onnxruntime on the demo model (trained: it copies the vitals block) and the tiny fixture
(random: its drafts are mostly rejected)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.config.models import ClinicalConfig
from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.engine.draft import DraftSettings
from edged.eval.datasets import DEFAULT_FILES, load
from edged.models import DEMO_MODEL
from edged.service.worker import draft_phrases


@pytest.fixture
def demo() -> Engine:
    """A fresh engine: no earlier answers to draft from."""
    return Engine.load(DEMO_MODEL, EngineOptions(threads=1, context_length=1024))


def _drafting(engine: Engine) -> None:
    """Skip a test of what drafting gains where the engine's load-time check turned
    speculation off: this CPU's kernels compute a batch's rows otherwise than one step at a
    time, beyond rounding (the identity tests still run there: they hold either way)."""
    if engine.options.speculation is None:
        pytest.skip(
            f"speculation off on this CPU (batch rows differ by {engine.speculation_checked:.3g})"
        )


def _prompts(engine: Engine, n: int) -> list[list[int]]:
    """The first `n` held-out questions as the daemon asks them (system prompt, vitals
    block, question)."""
    rows = load([DEFAULT_FILES[0]])[:n]
    return [engine.render_chat(r.data["messages"][:2], enable_thinking=False) for r in rows]


def _pair(engine: Engine, prompt: list[int], **config: object):
    """(plain, speculative) answers to `prompt`; the speculative one first, so that it cannot
    draft from the plain one's tokens (kept among the engine's recent answers)."""
    fast = engine.generate(prompt, GenerationConfig(**config))  # type: ignore[arg-type]
    plain = engine.generate(prompt, GenerationConfig(speculate=False, **config))  # type: ignore[arg-type]
    return plain, fast


NEAR_TIE = 0.02
"""Where a drafted answer leaves plain decoding's, the two tokens' logits must be closer than
this, relative to the largest: rounding (measured 1e-3 on some rows) decides such a tie, and
a wrong draft taken, or a rewind that kept a stale position, would not leave a tie behind."""


def _same_answer(engine: Engine, prompt: list[int], plain, fast) -> None:  # type: ignore[no-untyped-def]
    """The drafted answer is plain decoding's, token for token, or it leaves it at a near tie
    (README, "Speculative decoding": a batch's rows round otherwise than a step alone)."""
    if fast.token_ids == plain.token_ids:
        return
    a, b = fast.token_ids, plain.token_ids
    k = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
    assert k < min(len(a), len(b)), "one answer is cut short"
    row = engine.logits_for(prompt, [plain.token_ids[: k + 1]])[0][k]
    gap = abs(float(row[plain.token_ids[k]] - row[fast.token_ids[k]]))
    assert gap < NEAR_TIE * float(np.max(np.abs(row))), (k, gap)


@pytest.mark.arm64
def test_on_this_cpu_drafted_answers_are_the_answers_without_drafts(demo: Engine) -> None:
    """The short form of the tests below, for the ARM check: onnxruntime's kernels differ
    per CPU, and a batch's rows must stay within rounding of one step at a time."""
    for prompt in _prompts(demo, 2):
        plain, fast = _pair(demo, prompt, max_new_tokens=60)
        _same_answer(demo, prompt, plain, fast)
    assert demo.speculation_checked is not None


def test_the_demo_models_graph_can_verify_drafts(demo: Engine) -> None:
    assert demo.layout.logits_keep_input == "logits_to_keep"
    assert demo.manifest.logits == "last_n"


def test_greedy_answers_are_token_for_token_the_same_with_fewer_passes(demo: Engine) -> None:
    prompts = _prompts(demo, 6)
    results = [_pair(demo, prompt, max_new_tokens=160) for prompt in prompts]
    for prompt, (plain, fast) in zip(prompts, results, strict=True):
        _same_answer(demo, prompt, plain, fast)
        assert plain.speculation is None
    _drafting(demo)
    stats = [fast.speculation for _, fast in results]
    assert all(s is not None for s in stats)
    drafted = sum(s.drafted for s in stats if s)
    accepted = sum(s.accepted for s in stats if s)
    passes = sum(s.passes for s in stats if s)
    tokens = sum(fast.completion_tokens - 1 for _, fast in results)
    # The answers quote the vitals block and reuse the phrasing of the answers before them:
    # most drafts are taken, and a pass yields well over one token on average (the first
    # token comes from the prefill, not from a pass).
    assert accepted / drafted > 0.5, (accepted, drafted)
    assert tokens / passes > 1.3, (tokens, passes)


def test_the_streamed_text_is_the_same_delta_by_delta(demo: Engine) -> None:
    prompt = _prompts(demo, 1)[0]
    chunks: dict[bool, list[str]] = {True: [], False: []}
    for speculate in (False, True):
        config = GenerationConfig(max_new_tokens=120, speculate=speculate)
        demo.generate(prompt, config, on_text=chunks[speculate].append)
    assert "".join(chunks[True]) == "".join(chunks[False])
    assert chunks[True] == chunks[False]  # not only the text: each delta, in order


def test_stop_strings_and_the_token_cap_cut_at_the_same_token(demo: Engine) -> None:
    prompt = _prompts(demo, 1)[0]
    whole = demo.generate(prompt, GenerationConfig(max_new_tokens=160, speculate=False)).text
    stop = whole.split()[6]  # a word the answer writes, somewhere in its middle
    plain, fast = _pair(demo, prompt, max_new_tokens=160, stop=(stop,))
    assert fast.text == plain.text and stop not in fast.text and fast.finish_reason == "stop"
    for cap in (1, 2, 7, 30):
        plain, fast = _pair(demo, prompt, max_new_tokens=cap)
        assert fast.token_ids == plain.token_ids and len(fast.token_ids) == cap


def test_a_cancel_takes_effect_after_the_same_token(demo: Engine) -> None:
    prompt = _prompts(demo, 1)[0]
    results = []
    for speculate in (False, True):
        seen: list[str] = []

        def cancel_after_40_chars(seen: list[str] = seen) -> str | None:
            return "cancelled" if len("".join(seen)) >= 40 else None

        results.append(
            demo.generate(
                prompt,
                GenerationConfig(max_new_tokens=160, speculate=speculate),
                on_text=seen.append,
                stop_check=cancel_after_40_chars,
            )
        )
    plain, fast = results
    assert fast.finish_reason == plain.finish_reason == "cancelled"
    assert fast.token_ids == plain.token_ids


def test_the_reasoning_budget_closes_the_block_at_the_same_token(demo: Engine) -> None:
    rows = load([DEFAULT_FILES[0]])[:1]
    prompt = demo.render_chat(rows[0].data["messages"][:2], enable_thinking=True)
    plain, fast = _pair(demo, prompt, max_new_tokens=120, reasoning_budget=12)
    assert fast.token_ids == plain.token_ids and fast.reasoning == plain.reasoning


def test_sampling_decodes_one_token_at_a_time(demo: Engine) -> None:
    prompt = _prompts(demo, 1)[0]
    sampled = {"max_new_tokens": 40, "temperature": 0.8, "seed": 3}
    a = demo.generate(prompt, GenerationConfig(**sampled))  # type: ignore[arg-type]
    b = demo.generate(prompt, GenerationConfig(speculate=False, **sampled))  # type: ignore[arg-type]
    assert a.speculation is None and a.token_ids == b.token_ids


def test_fixed_phrases_are_drafted_from() -> None:
    """Answers that end in an escalation sentence: given the sentences as phrases, more of
    the answer comes from accepted drafts than without (no earlier answers to draft from)."""
    engine = Engine.load(
        DEMO_MODEL,
        EngineOptions(threads=1, context_length=1024, speculation=DraftSettings(recent_answers=0)),
    )
    _drafting(engine)
    phrases = draft_phrases(ClinicalConfig())
    with_phrases = without = 0
    for ids in _prompts(engine, 12):
        a = engine.generate(ids, GenerationConfig(max_new_tokens=160, draft_phrases=phrases))
        b = engine.generate(ids, GenerationConfig(max_new_tokens=160))
        _same_answer(engine, ids, b, a)
        assert a.speculation is not None and b.speculation is not None
        with_phrases += a.speculation.accepted
        without += b.speculation.accepted
    assert with_phrases > without


def test_earlier_answers_are_drafted_from(demo: Engine) -> None:
    """The second time a question is asked, its answer is drafted almost whole from the
    first (kept among the recent answers): the same tokens, in a few passes."""
    prompt = _prompts(demo, 1)[0]
    first = demo.generate(prompt, GenerationConfig(max_new_tokens=160))
    again = demo.generate(prompt, GenerationConfig(max_new_tokens=160))
    assert again.token_ids == first.token_ids
    _drafting(demo)
    assert again.speculation is not None
    assert again.speculation.passes * 4 < again.completion_tokens


def test_a_forgotten_answer_is_not_drafted_from(demo: Engine) -> None:
    """`forget_last_answer` drops the latest answer from the ones drafted from: asked again,
    the question drafts only from its prompt, as the first time."""
    prompt = _prompts(demo, 1)[0]
    first = demo.generate(prompt, GenerationConfig(max_new_tokens=160))
    demo.forget_last_answer()
    forgotten = demo.generate(prompt, GenerationConfig(max_new_tokens=160))
    remembered = demo.generate(prompt, GenerationConfig(max_new_tokens=160))
    assert first.token_ids == forgotten.token_ids == remembered.token_ids
    _drafting(demo)
    assert first.speculation is not None and forgotten.speculation is not None
    assert remembered.speculation is not None
    assert forgotten.speculation.passes == first.speculation.passes
    assert remembered.speculation.passes < forgotten.speculation.passes


def test_forgetting_an_answer_brings_back_the_one_it_pushed_out() -> None:
    """With the window of earlier answers full, an answer then forgotten (a benchmark's plain
    repeat) must leave the window as it was: the answer it had pushed out is drafted from
    again. Otherwise every forgotten repeat shrinks the window by one."""
    engine = Engine.load(
        DEMO_MODEL,
        EngineOptions(threads=1, context_length=1024, speculation=DraftSettings(recent_answers=1)),
    )
    _drafting(engine)
    first_prompt, other = _prompts(engine, 2)
    first = engine.generate(first_prompt, GenerationConfig(max_new_tokens=160))
    engine.generate(other, GenerationConfig(max_new_tokens=160, speculate=False))
    engine.forget_last_answer()
    again = engine.generate(first_prompt, GenerationConfig(max_new_tokens=160))
    assert again.token_ids == first.token_ids
    assert first.speculation is not None and again.speculation is not None
    assert again.speculation.passes * 4 < again.completion_tokens


def test_a_graph_that_cannot_verify_decodes_one_token_at_a_time() -> None:
    """The optimum layout (a growing KV cache, no logits_to_keep): no speculation."""
    from tests._models import TINY_QWEN3_INT4

    engine = Engine.load(TINY_QWEN3_INT4, EngineOptions(threads=1, context_length=256))
    result = engine.generate([5, 17, 300, 42] * 4, GenerationConfig(max_new_tokens=12))
    assert result.speculation is None and result.completion_tokens >= 1


@pytest.mark.export
def test_the_random_model_gives_the_same_tokens_whatever_its_drafts(tmp_path: Path) -> None:
    """A tiny random model, exported by the stream exporter: it repeats itself and rarely
    agrees with a draft, so passes are rejected and rewound all the time; the same tokens."""
    from tests._models import export_deps_missing, make_test_model

    if export_deps_missing():
        pytest.skip(str(export_deps_missing()))
    from edged.export import ExportOptions, export_model

    checkpoint = make_test_model().build_checkpoint(tmp_path / "checkpoint")
    out = tmp_path / "tiny-stream"
    export_model(ExportOptions(source=str(checkpoint), output=out, progress=False, verify=False))
    engine = Engine.load(out, EngineOptions(threads=1, context_length=256))
    assert engine.layout.logits_keep_input == "logits_to_keep"
    _drafting(engine)
    rng = np.random.default_rng(5)
    rejected = 0
    for _ in range(4):
        prompt = [int(t) for t in rng.integers(0, 1000, size=40)]
        plain, fast = _pair(engine, prompt, max_new_tokens=60, ignore_eos=True)
        _same_answer(engine, prompt, plain, fast)
        assert fast.speculation is not None
        rejected += fast.speculation.drafted - fast.speculation.accepted
    assert rejected > 0  # the rewinds were exercised


def test_a_verification_pass_gives_each_rows_logits_in_and_beyond_the_reused_buffer() -> None:
    """A pass of up to VERIFY_ROWS tokens writes its logits into one reused buffer, a longer
    one into onnxruntime's; either way row i is the step after token i, and a shorter pass
    after a longer one shows nothing of the longer one's rows."""
    from edged.engine.engine import BATCH_TOLERANCE
    from edged.engine.runner import VERIFY_ROWS
    from tests._models import demo_runner

    runner = demo_runner(512)
    prompt = list(range(40, 90))
    runner.forward(prompt)
    runner.verify(list(range(200, 200 + VERIFY_ROWS)))  # leaves other rows in the buffer
    for n in (3, VERIFY_ROWS, VERIFY_ROWS + 3):
        tokens = list(range(300, 300 + n))
        worst = max(runner.batch_differences(prompt, tokens, chunk=64))
        assert worst < BATCH_TOLERANCE, (n, worst)
