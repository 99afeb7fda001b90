"""Prompt-lookup drafting and the draft-length policy: pure bookkeeping over token ids, no
model (the engine's speculative decoding is tested in test_speculation.py)."""

from __future__ import annotations

import pytest

from edged.engine.draft import (
    AnswerWindow,
    DraftLength,
    DraftSettings,
    DraftStats,
    PromptLookup,
    phrase_counts,
)

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


def test_a_token_is_drafted_only_where_most_earlier_occurrences_agree_on_it() -> None:
    # "4, 5" was followed by 20 three times and by 10 once: 3 of 4 votes, above min_share 0.7.
    agreed = [1, 4, 5, 20, 21, 2, 4, 5, 10, 11, 3, 4, 5, 20, 21, 6, 4, 5, 20, 21, 8, 4, 5]
    assert PromptLookup(agreed).propose(2) == [20, 21]
    # Twice against once is 0.67 of the votes: a coin toss, nothing is drafted.
    split = [1, 4, 5, 20, 21, 2, 4, 5, 10, 11, 3, 4, 5, 20, 21, 8, 4, 5]
    assert PromptLookup(split).propose(2) == []
    assert PromptLookup(split, settings=DraftSettings(min_share=0.6)).propose(2) == [20, 21]
    # A tie, where min_share allows one, goes to the lowest id, whichever came first.
    tie = [9, 4, 5, 30, 8, 4, 5, 20, 7, 4, 5]
    assert PromptLookup(tie, settings=DraftSettings(min_share=0.5)).propose(1) == [20]


def test_a_draft_stops_where_the_earlier_occurrences_part_ways() -> None:
    # "1, 2" was always followed by 3, but "1, 2, 3" once by 4 and once by 5.
    lookup = PromptLookup([1, 2, 3, 4, 9, 1, 2, 3, 5, 9, 7, 1, 2])
    assert lookup.propose(8) == [3]


def test_a_single_repeated_token_is_no_match_unless_asked_for() -> None:
    # "4" recurs, always followed by 20, but no two tokens in a row recur: a one-token match
    # guesses badly (draft.py, min_ngram), so by default nothing is drafted; min_ngram=1
    # restores the guess (and stops where "4, 20" was followed by 8 and by 9).
    prompt = [3, 4, 20, 8, 5, 4, 20, 9, 6, 4]
    assert PromptLookup(prompt).propose(2) == []
    assert PromptLookup(prompt, settings=DraftSettings(min_ngram=1)).propose(2) == [20]


def test_the_text_never_matches_its_own_last_tokens() -> None:
    lookup = PromptLookup([1, 2, 3])
    assert lookup.propose(4) == []  # [2, 3] and [1, 2, 3] occur only at the very end
    lookup.append(1)
    lookup.append(2)
    # "1, 2" was followed by 3, "1, 2, 3" by 1...: a draft goes on through its own tokens.
    assert lookup.propose(4) == [3, 1, 2, 3]


def test_fixed_phrases_are_drafted_from_where_the_text_has_no_match() -> None:
    escalation = [40, 41, 42, 43, 44]
    phrases = [phrase_counts([escalation], DraftSettings())]
    lookup = PromptLookup([1, 2, 3], phrases)
    lookup.append(40)
    lookup.append(41)
    assert lookup.propose(8) == [42, 43, 44]
    # Where the text (about this wearer) and a phrase disagree, nothing is drafted, however
    # often it is asked (the text is counted once)...
    lookup = PromptLookup([40, 41, 99, 98], phrases)
    lookup.append(40)
    lookup.append(41)
    assert [lookup.propose(2) for _ in range(3)] == [[], [], []]
    # ...and the vote counts every source: three recent answers outvote the text.
    window = AnswerWindow(DraftSettings())
    for _ in range(3):
        window.add([7, 40, 41, 42, 43])
    lookup = PromptLookup([40, 41, 99, 98], [window.counts])
    lookup.append(40)
    lookup.append(41)
    assert lookup.propose(2) == [42, 43]


def test_nothing_is_drafted_without_a_match_or_room() -> None:
    lookup = PromptLookup([1, 2, 3, 4])
    lookup.append(9)
    assert lookup.propose(4) == []
    lookup.append(1)
    assert lookup.propose(0) == []


def _counted(*sequences: list[int]) -> dict:
    return phrase_counts(sequences, DraftSettings()).table


def test_the_answer_window_counts_the_latest_answers_and_forgets_the_last_whole() -> None:
    a, b, c = [1, 2, 3, 4, 5], [1, 2, 3, 9, 5, 6], [8, 2, 3, 4, 1, 2]
    window = AnswerWindow(DraftSettings(recent_answers=2))
    window.add(a)
    window.add(b)
    assert window.counts.table == _counted(a, b)
    window.add(c)  # pushes a out
    assert len(window) == 2 and window.counts.table == _counted(b, c)
    window.forget_last()  # takes c out and puts a back
    assert window.counts.table == _counted(a, b)
    window.forget_last()  # only the latest add is undone, once
    assert len(window) == 2 and window.counts.table == _counted(a, b)
    window.add([7])  # nothing to count: not kept, and forgetting it forgets nothing else
    window.forget_last()
    assert len(window) == 2 and window.counts.table == _counted(a, b)
    off = AnswerWindow(DraftSettings(recent_answers=0))
    off.add(a)
    assert len(off) == 0 and off.counts.table == {}


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
        ({"min_share": 0}, "min_share = 0 must be above 0 and at most 1"),
        ({"min_share": 1.5}, "min_share = 1.5 must be above 0 and at most 1"),
        ({"misses_to_cool": 0}, "misses_to_cool = 0 >= 1"),
    ],
)
def test_bad_draft_settings_name_the_field_and_the_limit(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DraftSettings(**kwargs)
