"""tools/draft_policy.py: the offline replay of drafting policies is only worth its numbers if
it does what the engine does. On the demo model's real answers it must reproduce the engine's
own trace pass for pass, under the defaults and under other settings."""

from __future__ import annotations

import pytest
from _models import load_tool

from edged.engine.draft import DraftSettings

draft_policy = load_tool("draft_policy")


@pytest.mark.parametrize(
    "settings",
    [
        DraftSettings(),
        DraftSettings(min_ngram=1, min_share=0.5),
        DraftSettings(max_draft=3, recent_answers=2),
    ],
    ids=["defaults", "min_ngram=1,min_share=0.5", "short-drafts-small-window"],
)
def test_the_replay_reproduces_the_engines_trace(settings: DraftSettings) -> None:
    answers, phrases, limits = draft_policy.record(6, 0, settings)
    assert sum(d for a in answers for d, _ in a.trace) > 0, "nothing was drafted"
    assert draft_policy.replay(answers, phrases, settings, limits) == [a.trace for a in answers]


def test_settings_are_parsed_over_the_defaults_and_bad_ones_named() -> None:
    assert draft_policy.parse_settings("min_ngram=1,max_draft=5") == DraftSettings(
        min_ngram=1, max_draft=5
    )
    assert draft_policy.parse_settings("min_share=0.5") == DraftSettings(min_share=0.5)
    assert draft_policy.parse_settings("") == DraftSettings()
    with pytest.raises(ValueError, match="'min_gram=1'"):
        draft_policy.parse_settings("min_gram=1")
    with pytest.raises(ValueError, match="'max_draft=2.5'"):
        draft_policy.parse_settings("max_draft=2.5")
    with pytest.raises(ValueError, match="min_ngram = 0 must be between 1"):
        draft_policy.parse_settings("min_ngram=0")
