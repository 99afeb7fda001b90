"""Does the model's answer reassure a wearer whom the triage says to escalate? A small,
deliberately transparent phrase matcher (issue #12, "the guard reads the answer").

Two kinds of contradiction are found, only where the guard's escalation is due (medium or
high NEWS2 risk, or a red flag):

* **Reassurance**: a phrase from `REASSURANCES` ("nothing to worry about", "this is normal",
  "no need to see anyone", ...), unless a negation stands just before it in the same sentence
  ("I would not say there is nothing to worry about").
* **Understated risk**: the answer names a risk band lower than the triage's ("low risk" for a
  wearer at medium risk).

It is a safety net for a small model's wording, not an understanding of the text: it errs on
the side of flagging (a flagged answer only gets the escalation put first), and its phrase
lists are the documentation of what it catches (docs/clinical.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edged.clinical.news2 import risk_rank
from edged.domain import Risk

REASSURANCES: tuple[str, ...] = (
    r"nothing (?:at all )?to worry about",
    r"no (?:need|reason) (?:for you )?to (?:worry|be worried|panic)",
    r"(?:do not|don't|dont) (?:need to )?worry",
    r"nothing (?:serious|wrong|to be concerned about|of concern)",
    r"not (?:anything )?(?:serious|worrying|a concern|dangerous)",
    r"(?:this|that|it|these readings|your readings|your numbers) (?:is|are|looks?|seems?) "
    r"(?:perfectly |completely |totally |quite )?(?:normal|fine|okay|ok|healthy|reassuring)",
    r"(?:readings|numbers|results) (?:look|are|seem) (?:all )?(?:normal|fine|good|healthy)",
    r"(?:within|in) (?:the )?(?:usual|normal) range",
    r"no (?:need|reason) to (?:see|call|contact|phone|visit) (?:anyone|a doctor|your doctor|"
    r"a clinician|your care team|emergency services)",
    r"no (?:action|treatment|follow-up) (?:is )?(?:needed|necessary|required)",
    r"(?:you are|you're|you seem|you look) (?:fine|okay|ok|well|healthy|in good health)",
    r"(?:all|everything) (?:is|looks|seems) (?:well|fine|good|normal|okay|ok)",
    r"(?:safe|fine|okay|ok) to ignore",
    r"(?:can|may) (?:safely )?ignore (?:it|this|these|them|the readings?|the alert)",
)
"""What a reassurance looks like, as regular expressions over lower-cased text."""

NEGATIONS: tuple[str, ...] = (
    "not",
    "never",
    "cannot",
    "can't",
    "cant",
    "isn't",
    "aren't",
    "wouldn't",
    "won't",
    "hardly",
    "unlikely",
)
"""A word among the few before a reassurance that turns it around."""
NEGATION_WINDOW = 4

_REASSURANCE_RE = re.compile("|".join(f"(?:{p})" for p in REASSURANCES))
_RISK_RE = re.compile(r"\b(low-medium|low medium|low_medium|low|medium|high)[ -]risk\b")
_SENTENCE_END = re.compile(r"[.!?;:\n]")
_WORD = re.compile(r"[a-z']+")
_RISK_NAMES = {"low": Risk.LOW, "medium": Risk.MEDIUM, "high": Risk.HIGH}


@dataclass(frozen=True)
class Contradiction:
    phrases: tuple[str, ...]
    """What was matched, as written (lower-cased): the reassurances and understated risks."""


def _negated(text: str, start: int) -> bool:
    sentence_start = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    before = _WORD.findall(text[sentence_start:start])[-NEGATION_WINDOW:]
    return any(word in NEGATIONS for word in before)


def reassurances(text: str) -> list[str]:
    """Reassuring phrases in `text` that no negation turns around."""
    lowered = text.lower()
    return [
        m.group(0) for m in _REASSURANCE_RE.finditer(lowered) if not _negated(lowered, m.start())
    ]


def understated_risks(text: str, risk: str | None) -> list[str]:
    """Risk bands the text names that are lower than `risk` (the triage's)."""
    if risk is None:
        return []
    found = []
    for m in _RISK_RE.finditer(text.lower()):
        band = m.group(1).replace(" ", "_").replace("-", "_")
        named = Risk.LOW_MEDIUM if band == "low_medium" else _RISK_NAMES[band]
        if risk_rank(named) < risk_rank(risk) and not _negated(text.lower(), m.start()):
            found.append(m.group(0))
    return found


def find_contradiction(text: str, risk: str | None) -> Contradiction | None:
    """The reassurances and understated risks of an answer whose escalation is due, or None.
    `risk` is the triage's NEWS2 risk."""
    phrases = tuple(reassurances(text) + understated_risks(text, risk))
    return Contradiction(phrases) if phrases else None
