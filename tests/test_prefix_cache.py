"""The prefix cache on the shared-KV runner: a cached prefix (the daemon's system prompt) is
held once, in the KV buffers themselves, and copied out only when a prompt that does not start
with it is about to write over it; restoring it then gives exactly the same logits. Real
onnxruntime on the demo model's graph."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.engine.runner import SharedKVRunner
from edged.models import DEMO_MODEL
from tests._models import demo_runner

PREFIX = list(range(40, 80))
QUESTION = list(range(120, 130))


def _runner() -> SharedKVRunner:
    return demo_runner(256)


def _answer_logits(runner: SharedKVRunner) -> np.ndarray:
    """The logits after the question, then after one more token, on top of the cache."""
    first = np.array(runner.forward(QUESTION), copy=True)
    return np.stack([first, np.array(runner.forward([7]), copy=True)])


@pytest.mark.arm64
def test_a_cached_prefix_is_copied_out_only_before_a_prompt_overwrites_it() -> None:
    runner = _runner()
    runner.forward(PREFIX)
    prefix = runner.snapshot()
    assert prefix.values is None  # held by the buffers, no second copy
    expected = _answer_logits(runner)

    runner.restore(prefix)  # the answer wrote beyond the prefix only: nothing to copy back
    assert prefix.values is None
    assert np.array_equal(_answer_logits(runner), expected)

    runner.reset()
    assert runner.release(0) > 0  # gives back the answer's pages, never the prefix's
    runner.restore(prefix)
    assert np.array_equal(_answer_logits(runner), expected)

    runner.reset()
    runner.forward(list(range(300, 360)))  # another prompt writes over the prefix's positions
    assert prefix.values is not None and len(prefix.values) == len(runner.layout.past_names)
    runner.restore(prefix)
    assert np.array_equal(_answer_logits(runner), expected)
    assert prefix.values is None  # the buffers hold it again: the copy is dropped


@pytest.mark.arm64
def test_a_replaced_prefix_is_neither_kept_nor_copied_out() -> None:
    """The runner holds its snapshot weakly: once the engine drops a prefix, its memory is
    freed and a prompt writes over its positions without saving them first."""
    runner = _runner()
    runner.forward(PREFIX)
    old = runner.snapshot()
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None
    runner.reset()
    runner.forward(list(range(300, 360)))
    new = runner.snapshot()
    assert new.values is None and new.length == 60


@pytest.mark.arm64
def test_the_system_prompt_cache_survives_prompts_without_it() -> None:
    """Engine level, as the daemon uses it: a prompt with another system message, and scoring
    (logits_for) in between, leave the cached system prompt's answers unchanged."""
    engine = Engine.load(DEMO_MODEL, EngineOptions(threads=1, context_length=512))
    greedy = GenerationConfig(max_new_tokens=24, speculate=False)

    def ask(system: str) -> list[int]:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Is 118 high?"}]
        return engine.render_chat(msgs, enable_thinking=False)

    ours, other = ask("Answer as a careful nurse would."), ask("Be terse.")
    cold = engine.generate(ours, greedy)
    cached = engine.set_system_prompt("Answer as a careful nurse would.")
    assert engine.generate(other, greedy).cached_tokens == 0
    engine.logits_for(other, [[5, 6, 7]])
    warm = engine.generate(ours, greedy)
    again = engine.generate(ours, greedy)
    assert cached > 5 and warm.cached_tokens == cached == again.cached_tokens
    assert warm.token_ids == cold.token_ids == again.token_ids
