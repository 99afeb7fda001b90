"""The guard reads the answer: reassurance and understated risk, where escalation is due."""

from __future__ import annotations

import pytest

from edged.clinical.advice import guard
from edged.clinical.contradiction import find_contradiction, reassurances, understated_risks
from edged.clinical.triage import assess
from edged.config.models import ClinicalConfig
from edged.domain import Vitals, VitalStat

pytestmark = pytest.mark.arm64

REASSURING = [
    "There is nothing to worry about.",
    "Don't worry, this happens to everyone.",
    "You do not need to worry about these numbers.",
    "No need to worry: rest and drink water.",
    "This is normal after climbing stairs.",
    "Your readings are perfectly normal.",
    "Your numbers look fine.",
    "The readings look normal to me.",
    "Everything looks fine today.",
    "There is no need to see anyone about this.",
    "No need to call your doctor.",
    "No action is needed.",
    "You are fine.",
    "It is nothing serious.",
    "It's not dangerous.",
    "Your values are within the usual range.",
    "You can safely ignore the alert.",
]
NOT_REASSURING = [
    "Your oxygen level is low: call your care team now.",
    "This is not normal: contact your care team.",
    "I would not say there is nothing to worry about.",
    "I cannot tell you that everything looks fine.",
    "Your breathing rate is 26 per minute, faster than normal.",
    "Please do not ignore this: call your emergency number.",
    "It is unlikely that your readings are normal.",
    "Your heart rate is above the normal range.",
    "Sit down and rest, then measure again.",
]


@pytest.mark.parametrize("sentence", REASSURING)
def test_reassurances_are_found(sentence: str) -> None:
    assert reassurances(sentence), sentence


@pytest.mark.parametrize("sentence", NOT_REASSURING)
def test_warnings_and_negated_reassurances_are_not(sentence: str) -> None:
    assert reassurances(sentence) == [], sentence


@pytest.mark.parametrize(
    ("text", "risk", "understated"),
    [
        ("NEWS2 is 6, which means low risk.", "medium", ["low risk"]),
        ("Your early-warning score shows low-medium risk.", "high", ["low-medium risk"]),
        ("The score is 8: medium risk.", "high", ["medium risk"]),
        ("NEWS2 6, medium risk.", "medium", []),
        ("This is high risk, not low risk.", "high", []),  # "not low risk" is negated
        ("Low risk.", "low", []),
        ("Low risk.", None, []),
    ],
)
def test_a_lower_risk_band_than_the_triage_is_understated(
    text: str, risk: str | None, understated: list[str]
) -> None:
    assert understated_risks(text, risk) == understated


CFG = ClinicalConfig()
HIGH = assess(
    [Vitals(ts=1.7e9, spo2=VitalStat(mean=85), resp_rate=VitalStat(mean=26))], CFG.red_flags
)
LOW = assess(
    [Vitals(ts=1.7e9, spo2=VitalStat(mean=98), heart_rate=VitalStat(mean=70))], CFG.red_flags
)


def test_the_guard_puts_the_escalation_first_and_marks_a_reassuring_answer() -> None:
    advice = guard(HIGH, "Your readings are normal, nothing to worry about.", CFG)
    assert advice.escalation is not None
    assert advice.text.startswith(advice.escalation)
    assert advice.contradiction is not None
    assert advice.contradiction.phrases == ("your readings are normal", "nothing to worry about")


def test_an_escalating_answer_is_left_as_written() -> None:
    text = "Your oxygen level is 85 %: call your care team now."
    advice = guard(HIGH, text, CFG)
    assert advice.text == text and advice.contradiction is None


def test_reassurance_is_fine_when_no_escalation_is_due() -> None:
    text = "Your readings are normal, nothing to worry about."
    advice = guard(LOW, text, CFG)
    assert advice.escalation is None and advice.contradiction is None and advice.text == text


def test_find_contradiction_collects_both_kinds() -> None:
    found = find_contradiction("No need to worry, this is low risk.", "high")
    assert found is not None and found.phrases == ("no need to worry", "low risk")
    assert find_contradiction("Call your care team now.", "high") is None


def test_the_advice_payload_says_what_the_guard_did() -> None:
    from edged.mqtt.payloads import guard_json

    marked = guard(HIGH, "This is normal, no need to see anyone. Low risk.", CFG)
    assert guard_json(marked) == {
        "contradiction": True,
        "phrases": ["this is normal", "no need to see anyone", "low risk"],
    }
    clean = guard(HIGH, "Call your care team now.", CFG)
    assert guard_json(clean) == {"contradiction": False, "phrases": []}
