"""What a generated answer says, checked against the dialogue's metadata (written by
tools/make_clinical_corpus.py from edged's own triage)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_SPACE = re.compile(r"\s+")
# Every way the corpus states the score (tools/make_clinical_corpus.py, risk_sentence): "NEWS2 5",
# "NEWS2 is 5", "(NEWS2) is 5"; and "NEWS2 score of 5", which models write too.
_NEWS2 = re.compile(r"NEWS2\)? (?:score )?(?:is |of )?(\d+)")


def cites(answer: str, value: str) -> bool:
    """Whether `value` (a number as the corpus writes it: "89", "38.4") stands in `answer` as
    a number of its own, not inside a longer one ("189", "38.45")."""
    return re.search(rf"(?<![\d.]){re.escape(value)}(?![\d]|\.\d)", answer) is not None


def cites_all(answer: str, values: Sequence[str]) -> bool:
    return all(cites(answer, v) for v in values)


def carries(answer: str, sentence: str) -> bool:
    """Whether the escalation `sentence` is in `answer`, whitespace and case aside."""
    norm = _SPACE.sub(" ", answer).strip().lower()
    return _SPACE.sub(" ", sentence).strip().lower() in norm


def states_news2(answer: str, score: int) -> bool:
    """Whether `answer` states the NEWS2 score, and only that one ("NEWS2 5")."""
    stated = _NEWS2.findall(answer)
    return bool(stated) and all(int(n) == score for n in stated)
