"""Sampling and text policies are pure functions: tested on plain arrays and strings."""

from __future__ import annotations

import numpy as np
import pytest

from edged.engine.sampling import SamplingParams, apply_repetition_penalty, select_token
from edged.engine.text import ReasoningState, find_stop, holdback

LOGITS = np.array([0.0, 5.0, 4.0, 1.0, -2.0, 3.0], dtype=np.float32)


def _draws(params: SamplingParams, n: int = 2000, seed: int = 0) -> set[int]:
    rng = np.random.default_rng(seed)
    return {select_token(LOGITS, params, rng) for _ in range(n)}


def test_temperature_zero_is_argmax() -> None:
    assert _draws(SamplingParams(temperature=0.0), n=5) == {1}


def test_top_k_keeps_only_the_k_best() -> None:
    assert _draws(SamplingParams(temperature=1.0, top_k=2)) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    # p(1) ~ 0.63, p(1)+p(2) ~ 0.87: top_p 0.5 keeps only the best, 0.8 keeps two.
    assert probs[1] > 0.5 and probs[1] + probs[2] > 0.8
    assert _draws(SamplingParams(temperature=1.0, top_p=0.5)) == {1}
    assert _draws(SamplingParams(temperature=1.0, top_p=0.8)) == {1, 2}


def test_high_temperature_reaches_every_token() -> None:
    assert _draws(SamplingParams(temperature=5.0), n=5000) == set(range(6))


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    out = apply_repetition_penalty(LOGITS, [1, 4, 1], 2.0)
    assert out[1] == pytest.approx(2.5) and out[4] == pytest.approx(-4.0)
    assert out[2] == LOGITS[2] and LOGITS[1] == 5.0, "input must not be modified"
    assert (
        select_token(
            LOGITS,
            SamplingParams(repetition_penalty=2.0),
            np.random.default_rng(0),
            context_ids=[1],
        )
        == 2
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature = -1.0"),
        ({"top_p": 0.0}, "top_p = 0.0"),
        ({"top_k": -3}, "top_k = -3"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_sampling_parameters_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_find_stop_returns_earliest_of_several() -> None:
    assert find_stop("abc STOP def END", ("END", "STOP")) == 4
    assert find_stop("nothing here", ("END",)) is None


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [
        ("answer <", ("<|im_end|>",), 1),
        ("answer <|im", ("<|im_end|>",), 4),
        ("answer", ("<|im_end|>",), 0),
        ("ab", ("b", "abc"), 2),
        ("x", ("",), 0),
    ],
)
def test_holdback_keeps_possible_stop_prefixes(
    text: str, stops: tuple[str, ...], held: int
) -> None:
    assert holdback(text, stops) == held


def test_reasoning_state_counts_tokens_inside_think_only() -> None:
    state = ReasoningState.after_prompt([5, 6], start_id=100, end_id=101, budget=2)
    assert not state.inside
    for tok in (7, 100, 8):
        state.observe(tok)
    assert state.inside and state.spent == 1 and not state.over_budget
    state.observe(9)
    assert state.over_budget
    state.observe(101)
    assert not state.inside and not state.over_budget


def test_prompt_ending_in_open_think_block_starts_inside() -> None:
    assert ReasoningState.after_prompt([1, 100, 5], 100, 101, None).inside
    assert not ReasoningState.after_prompt([1, 100, 5, 101], 100, 101, None).inside
    assert not ReasoningState.after_prompt([1, 100], None, None, None).inside
