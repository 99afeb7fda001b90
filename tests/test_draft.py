"""Prompt-lookup drafting and the draft-length policy: pure bookkeeping over token ids, no
model (the engine's speculative decoding is tested in test_speculation.py)."""

from __future__ import annotations

import pytest

from edged.engine.draft import DraftLength, DraftSettings, DraftStats, PromptLookup

pytestmark = pytest.mark.arm64


def test_the_continuation_of_the_longest_earlier_match_is_proposed() -> None:
    # "SpO2 : 89 % now , lowest 88 %" in the prompt; the answer has just written "SpO2 : 89".
    prompt = [7, 1, 2, 89, 3, 4, 5, 6, 88, 3, 9, 9, 1, 2, 70]
    lookup = PromptLookup(prompt)
    for token in (7, 1, 2, 89):
        lookup.append(token)
    assert lookup.propose(4) == [3, 4, 5, 6]
    assert lookup.propose(2) == [3, 4]  # never more than asked


def test_a_longer_match_wins_over_a_more_recent_shorter_one() -> None:
    # [1, 2] last occurs followed by 70, but [5, 1, 2] occurred followed by 30.
    lookup = PromptLookup([5, 1, 2, 30, 31, 8, 1, 2, 70, 71, 5, 1, 2])
    assert lookup.propose(2) == [30, 31]


def test_the_most_recent_occurrence_of_a_match_is_used() -> None:
    lookup = PromptLookup([4, 5, 10, 11, 4, 5, 20, 21, 4, 5])
    assert lookup.propose(2) == [20, 21]


def test_a_single_repeated_token_is_no_match_unless_asked_for() -> None:
    # "4" recurs, but no two tokens in a row do: a one-token match guesses badly (draft.py,
    # min_ngram), so by default nothing is drafted; min_ngram=1 restores the guess.
    prompt = [4, 10, 11, 4, 20, 21, 4]
    assert PromptLookup(prompt).propose(2) == []
    assert PromptLookup(prompt, settings=DraftSettings(min_ngram=1)).propose(2) == [20, 21]


def test_the_text_never_matches_its_own_last_tokens() -> None:
    lookup = PromptLookup([1, 2, 3])
    assert lookup.propose(4) == []  # [2, 3] and [1, 2, 3] occur only at the very end
    lookup.append(1)
    lookup.append(2)
    assert lookup.propose(4) == [3, 1, 2]  # "1, 2" was followed by "3, 1, 2" once


def test_fixed_phrases_are_drafted_from_where_the_text_has_no_match() -> None:
    escalation = [40, 41, 42, 43, 44]
    lookup = PromptLookup([1, 2, 3], phrases=[escalation])
    lookup.append(40)
    lookup.append(41)
    assert lookup.propose(8) == [42, 43, 44]
    # At equal length a match in the text (about this wearer) beats the phrase.
    lookup = PromptLookup([40, 41, 99, 98], phrases=[escalation])
    lookup.append(40)
    lookup.append(41)
    assert lookup.propose(2) == [99, 98]


def test_nothing_is_drafted_without_a_match_or_room() -> None:
    lookup = PromptLookup([1, 2, 3, 4])
    lookup.append(9)
    assert lookup.propose(4) == []
    lookup.append(1)
    assert lookup.propose(0) == []


def test_the_draft_length_grows_while_drafts_are_accepted_and_shrinks_when_not() -> None:
    policy = DraftLength(DraftSettings(max_draft=6), length=4)
    policy.record(drafted=4, accepted=4)
    assert policy.allowance() == 5
    policy.record(drafted=5, accepted=5)
    policy.record(drafted=6, accepted=6)
    assert policy.allowance() == 6  # capped at max_draft
    policy.record(drafted=6, accepted=1)
    assert policy.allowance() == 2  # one more than what was accepted


def test_drafting_pauses_after_misses_in_a_row_then_resumes() -> None:
    settings = DraftSettings(cooldown_steps=3, misses_to_cool=2)
    policy = DraftLength(settings, length=3)
    policy.record(drafted=3, accepted=0)
    assert policy.allowance() == 1
    policy.record(drafted=1, accepted=0)
    assert [policy.allowance() for _ in range(4)] == [0, 0, 0, 1]
    # A hit resets the run of misses.
    policy.record(drafted=1, accepted=0)
    policy.record(drafted=1, accepted=1)
    policy.record(drafted=2, accepted=0)
    assert policy.allowance() == 1


def test_the_stats_count_passes_and_keep_the_trace_when_asked() -> None:
    stats = DraftStats(trace=[])
    stats.record(0, 0)
    stats.record(4, 3)
    stats.record(2, 0)
    assert (stats.passes, stats.drafted, stats.accepted) == (3, 6, 3)
    assert stats.acceptance == 0.5 and stats.trace == [(0, 0), (4, 3), (2, 0)]
    assert DraftStats().acceptance is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_ngram": 0}, "min_ngram = 0 must be between 1 and max_ngram = 4"),
        ({"min_ngram": 5}, "min_ngram = 5 must be between 1 and max_ngram = 4"),
        ({"max_draft": 0}, "max_draft = 0 must be >= 1"),
        ({"misses_to_cool": 0}, "misses_to_cool = 0 >= 1"),
    ],
)
def test_bad_draft_settings_name_the_field_and_the_limit(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DraftSettings(**kwargs)
