#!/usr/bin/env python3
"""A seeded corpus of chat dialogues about a wearer's vitals, for the demo model (issue #12).

Every dialogue is built from edged's own clinical code, so what the answer says is what the
daemon computes: a window of vitals summaries (normal or deteriorating, with missing fields and
device events), rendered with the daemon's own vitals block and triage line; a wearer's
question (many paraphrases); a short reasoning block in `<think>` tags that reads the numbers;
and an answer that cites the abnormal values, states the NEWS2 risk that `edged.clinical`
computes, and carries the configured escalation sentence exactly when the guard would. The
wording varies (several templates per part, synonyms, numbers in different forms) so a model
has to learn to read the numbers, not memorise a string.

    python tools/make_clinical_corpus.py --out ~/.cache/edged/demo-corpus
    python tools/make_clinical_corpus.py --out DIR --train 2000 --heldout 200   # smaller

Writes `train.jsonl` and `heldout.jsonl` (dialogues: {"messages": [...], "meta": {...}}),
`mcq_train.jsonl` and `mcq_test.jsonl` (MedQA-style: question, options A-E, answer letter)
and `corpus.json` (counts, seed). The splits use disjoint seeds; the same seed gives the same
files on every machine. Synthetic data about synthetic people: not medical advice.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.clinical.advice import _VITALS as _BLOCK_VITALS
from edged.clinical.advice import (
    escalation,
    triage_line,
    user_message,
    vital_lines,
    vitals_context,
)
from edged.clinical.news2 import (
    score_heart_rate,
    score_resp_rate,
    score_spo2,
    score_systolic_bp,
    score_temp_c,
)
from edged.clinical.triage import Triage, assess
from edged.clinical.window import summarize
from edged.config.models import DEFAULT_SYSTEM_PROMPT, ClinicalConfig
from edged.domain import Vitals, VitalStat
from edged.eval.datasets import DATA_DIR, mcq_answer, mcq_user_message

SEED = 20261202
CLINICAL = ClinicalConfig()
WINDOW_S = CLINICAL.window_s
T0 = 1_780_000_000.0  # a fixed clock: the corpus must not depend on the day it is made


# -- vitals windows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    weight: float
    make: Callable[[random.Random, int], dict[str, Any]]
    """(rng, index of the summary in the window) -> the summary's fields."""
    topics: tuple[str, ...] = ()
    """Questions this wearer is likely to ask (others are asked too)."""


def _normal(rng: random.Random, i: int) -> dict[str, Any]:
    return {
        "heart_rate": rng.uniform(58, 86),
        "spo2": rng.uniform(95, 99),
        "resp_rate": rng.uniform(12, 18),
        "temp_c": rng.uniform(36.2, 37.4),
        "systolic_bp": rng.uniform(110, 140),
        "activity": rng.choice(("rest", "rest", "walk", "sleep")),
    }


def _with(**ranges: tuple[float, float]) -> Callable[[random.Random, int], dict[str, Any]]:
    def make(rng: random.Random, i: int) -> dict[str, Any]:
        fields = _normal(rng, i)
        for name, (lo, hi) in ranges.items():
            fields[name] = rng.uniform(lo, hi)
        return fields

    return make


def _falling_spo2(rng: random.Random, i: int) -> dict[str, Any]:
    fields = _normal(rng, i)
    fields.update(
        spo2=rng.uniform(95, 97) - i * rng.uniform(1.5, 2.5),
        resp_rate=rng.uniform(19, 27),
        heart_rate=rng.uniform(92, 116),
        activity="rest",
    )
    return fields


def _event(name: str, **ranges: tuple[float, float]) -> Callable[[random.Random, int], dict]:
    base = _with(**ranges)

    def make(rng: random.Random, i: int) -> dict[str, Any]:
        fields = base(rng, i)
        if i == 0:
            fields["events"] = [name]
        return fields

    return make


def _rising_resting(rng: random.Random, i: int) -> dict[str, Any]:
    fields = _normal(rng, i)
    fields["activity"] = "rest"
    fields["heart_rate"] = rng.uniform(60, 70) if i > 0 else rng.uniform(88, 100)
    return fields


def _glitch(rng: random.Random, i: int) -> dict[str, Any]:
    fields = _normal(rng, i)
    if i == 0:
        fields["spo2_min"] = rng.uniform(72, 82)  # one reading's dip: a loose strap
    return fields


def _sparse(rng: random.Random, i: int) -> dict[str, Any]:
    fields = _normal(rng, i)
    keep = rng.choice((("heart_rate",), ("spo2",), ("heart_rate", "spo2"), ("temp_c",)))
    return {k: v for k, v in fields.items() if k in keep or k == "activity"}


SCENARIOS = (
    Scenario("normal", 28, _normal),
    Scenario("mild_fever", 7, _with(temp_c=(37.8, 38.7), heart_rate=(86, 102)), ("fever",)),
    Scenario(
        "high_fever",
        6,
        _with(temp_c=(39.1, 40.2), heart_rate=(100, 122), resp_rate=(19, 24)),
        ("fever",),
    ),
    Scenario("hypoxia", 10, _falling_spo2, ("breathless", "chest_pain")),
    Scenario("tachycardia", 7, _with(heart_rate=(116, 142)), ("dizzy", "chest_pain")),
    Scenario("bradycardia", 4, _with(heart_rate=(34, 44)), ("dizzy",)),
    Scenario("hypotension", 5, _with(systolic_bp=(84, 100), heart_rate=(94, 114)), ("dizzy",)),
    Scenario("fall", 5, _event("fall"), ("dizzy",)),
    Scenario("irregular", 5, _event("irregular_rhythm", heart_rate=(88, 126)), ("watch",)),
    Scenario("rising_resting", 5, _rising_resting, ("sleep", "exercise")),
    Scenario("fast_breathing", 5, _with(resp_rate=(22, 28)), ("breathless",)),
    Scenario("sparse", 7, _sparse),
    Scenario("glitch", 3, _glitch, ("watch",)),
    Scenario("none", 3, _normal),
)
_OPTIONAL = ("heart_rate", "spo2", "resp_rate", "temp_c", "systolic_bp")


PLAIN_SHARE = 0.3
"""Of the windows, those from a gateway that sends plain numbers (`"heart_rate": 112`) rather
than a summary with min and max: the block then says "heart rate: 112 /min", with no range,
and an answer must not invent one."""


def _stat(
    name: str, value: float, rng: random.Random, fields: dict[str, Any], plain: bool
) -> VitalStat:
    if name == "temp_c":
        return VitalStat(round(value, 1))
    if plain and "spo2_min" not in fields:
        return VitalStat(min(100, round(value)) if name == "spo2" else round(value))
    if name == "heart_rate":
        mean = round(value)
        return VitalStat(mean, mean - rng.randint(2, 9), mean + rng.randint(2, 12))
    if name == "spo2":
        mean = min(100, round(value))
        low = fields.get("spo2_min")
        return VitalStat(mean, min(mean, round(low) if low else mean - rng.randint(0, 2)))
    return VitalStat(round(value))


def make_window(rng: random.Random, scenario: Scenario) -> list[Vitals]:
    """The wearer's recent summaries, oldest first (empty for the `none` scenario)."""
    if scenario.name == "none":
        return []
    count = rng.randint(4, 6) if scenario.name == "rising_resting" else rng.randint(1, 5)
    plain = rng.random() < PLAIN_SHARE
    window: list[Vitals] = []
    for i in reversed(range(count)):  # i = summaries before the latest
        fields = scenario.make(rng, i)
        present: dict[str, Any] = {  # Vitals' optional fields, by name
            name: _stat(name, fields[name], rng, fields, plain)
            for name in _OPTIONAL
            if name in fields and (scenario.name == "rising_resting" or rng.random() > 0.12)
        }
        window.append(
            Vitals(
                ts=T0 - i * 60,
                window_s=60,
                activity=fields.get("activity"),
                on_oxygen=False if rng.random() < 0.6 else None,
                events=tuple(fields.get("events", ())),
                **present,
            )
        )
    return window


# -- findings: what the answer must cite ------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    name: str
    """A NEWS2 parameter or a red flag."""
    value: float | None
    """The value that makes it abnormal, which the answer must quote (None for an event)."""
    phrases: tuple[str, ...]
    """Ways to say it. They quote the vitals block itself ("94 % now, lowest 89 %") or the
    red flag's own detail, so the model learns to copy the wearer's numbers from the prompt
    rather than to recall plausible ones."""


_SCORERS: dict[str, Callable[[float], int]] = {
    "spo2": score_spo2,
    "resp_rate": score_resp_rate,
    "heart_rate": score_heart_rate,
    "systolic_bp": score_systolic_bp,
    "temp_c": score_temp_c,
}
# RCP NEWS2 2017, chart 1: the zero-point band of each parameter; a scoring value above its
# top is high, below its bottom is low.
_ZERO_BAND = {
    "spo2": (96, 100),
    "resp_rate": (12, 20),
    "heart_rate": (51, 90),
    "systolic_bp": (111, 219),
    "temp_c": (36.1, 38.0),
}
# The answer quotes a vital exactly as the block writes it ("SpO2: 94 % now, lowest 89 %"):
# the same tokens before the numbers as in the prompt make copying them what a small model
# learns (an induction pattern), instead of recalling plausible numbers.
_LOW = ("your readings show {label}: {d}, lower than it should be", "{label}: {d}, which is low")
_HIGH = ("your readings show {label}: {d}, higher than usual", "{label}: {d}, which is high")
_COVERED = {  # red flags that a NEWS2 finding on the same vital already quotes
    "spo2_low": "spo2",
    "resting_tachycardia": "heart_rate",
    "bradycardia": "heart_rate",
    "fever": "temp_c",
}


def findings(window: Sequence[Vitals], triage: Triage) -> list[Finding]:
    """The abnormal values of the window: each NEWS2 parameter scoring points (its worst
    value, quoted as the block describes the vital) and each red flag, in reading order."""
    if not window:
        return []
    w = summarize(window)
    described = {field: (label, text) for field, label, text in vital_lines(window)}
    out: list[Finding] = []
    for name, score in _SCORERS.items():
        points = triage.news2.components.get(name, 0)
        if not points or name not in w.lows or name not in described:
            continue
        # The extreme that scored (the higher one on a tie), and on which side of normal it is.
        worst = max((w.highs[name], w.lows[name]), key=score)
        high = worst > _ZERO_BAND[name][1]
        label, text = described[name]
        phrases = tuple(p.format(label=label, d=text) for p in (_HIGH if high else _LOW))
        out.append(Finding(name, worst, phrases))
    names = {f.name for f in out}
    for flag in triage.red_flags:
        if _COVERED.get(flag.name) in names:
            continue
        value = w.resting_hr[-1] if flag.name == "resting_hr_rising" else None
        if flag.name in _COVERED:  # the vital scored no NEWS2 points: quote the flag's number
            value = _flag_value(flag.name, w)
        phrases = (f"red flag: {flag.detail}", f"there is a red flag: {flag.detail}")
        out.append(Finding(flag.name, value, phrases))
    return out


def _flag_value(name: str, w: Any) -> float | None:
    return {
        "spo2_low": w.lows.get("spo2"),
        "resting_tachycardia": w.resting_hr_high,
        "bradycardia": w.lows.get("heart_rate"),
        "fever": w.highs.get("temp_c"),
    }[name]


CITED = 3
"""An answer names at most this many findings (the first, in a clinician's reading order)."""


def cited(value: float) -> str:
    """A value as the answer writes it (and as the eval harness looks for it)."""
    return f"{value:g}"


# -- text ------------------------------------------------------------------------------------

QUESTIONS: dict[str, tuple[str, ...]] = {
    "dizzy": (
        "I feel dizzy when I stand up. Should I worry?",
        "I keep getting light-headed. Is something wrong?",
        "Why do I feel faint this afternoon?",
        "The room spins when I get up from the sofa. What should I do?",
        "I feel wobbly and dizzy today. Is that my heart?",
    ),
    "breathless": (
        "I am short of breath. What should I do?",
        "I get out of breath climbing the stairs. Is that normal?",
        "It feels hard to breathe tonight. Should I be worried?",
        "I can't catch my breath. What do my readings say?",
    ),
    "chest_pain": (
        "I have a tight feeling in my chest. Is it serious?",
        "My chest hurts a little when I breathe in. What should I do?",
        "I feel pressure in my chest. Should I call someone?",
    ),
    "fever": (
        "I feel hot and shivery. Do I have a fever?",
        "I think I am running a temperature. What should I do?",
        "I have chills and a headache. Is it a fever?",
        "My forehead feels hot. Should I worry?",
    ),
    "sleep": (
        "I slept badly last night. Is my heart okay?",
        "Why am I so tired even after sleeping?",
        "Did anything unusual happen while I slept?",
    ),
    "exercise": (
        "Is it safe for me to go for a walk today?",
        "Can I do my exercise class this evening?",
        "Should I skip my run today?",
    ),
    "medication": (
        "When should I take my blood pressure tablet?",
        "Can I take a painkiller for this?",
        "I forgot my morning pills. What should I do?",
    ),
    "watch": (
        "Is my watch wrong? The numbers look strange.",
        "Can I trust these readings?",
        "My watch beeped an alarm. What does it mean?",
    ),
    "general": (
        "How am I doing today?",
        "Are my readings okay?",
        "Is everything alright with me?",
        "Should I be worried about anything?",
    ),
}

READBACK: dict[str, str | None] = {
    "What is my heart rate?": "heart_rate",
    "How fast is my pulse right now?": "heart_rate",
    "What was my lowest oxygen level?": "spo2",
    "What is my SpO2?": "spo2",
    "How fast am I breathing?": "resp_rate",
    "What is my temperature?": "temp_c",
    "What does my watch say my blood pressure is?": "systolic_bp",
    "What are my numbers?": None,
    "Can you read me my readings?": None,
    "What does my watch show?": None,
}
"""Questions asking for the readings themselves, and the vital each asks for (None: all)."""
QUESTIONS["readings"] = tuple(READBACK)
_LABELS = {field: label for field, label, _, _ in _BLOCK_VITALS}

OPENERS: dict[str, tuple[str, ...]] = {
    "dizzy": ("Dizziness on standing is common.", "Feeling light-headed has many causes."),
    "breathless": ("Breathlessness should be taken seriously.", "Let us look at your breathing."),
    "chest_pain": ("Chest discomfort always deserves attention.",),
    "fever": ("Let us check your temperature and pulse.", "A fever often comes with chills."),
    "sleep": ("A bad night can leave you tired.", "Let us look at your recent readings."),
    "exercise": ("Let us check your readings before you exercise.",),
    "medication": ("I cannot advise on medicines or doses; your pharmacist or care team can.",),
    "watch": ("A single reading can be off.", "Wearables are sometimes wrong."),
    "general": ("Here is what your readings show.", "Let us look at your numbers."),
    "readings": ("Here are your latest readings.", "This is what your devices measured."),
}

SELF_CARE: dict[str, tuple[str, ...]] = {
    "dizzy": ("Sit or lie down when it happens and stand up slowly.", "Drink some water."),
    "breathless": ("Sit upright and rest.", "Breathe slowly and rest for a while."),
    "chest_pain": (
        "If the pain is severe, spreading or with sweating, call your emergency number.",
    ),
    "fever": ("Rest and drink plenty of fluids.", "Keep cool and drink water."),
    "sleep": ("Keep a regular bedtime and rest today.",),
    "exercise": ("Gentle activity is fine if you feel well.", "A short, easy walk is reasonable."),
    "medication": ("Keep taking what was prescribed unless your care team says otherwise.",),
    "watch": ("Check that the strap is snug and measure again sitting still.",),
    "general": ("Keep an eye on how you feel.",),
    "readings": ("Keep an eye on how you feel.", "Wear the watch snugly for steady readings."),
}

NORMAL_LEADS = (
    "Your readings look within the usual range",
    "Your numbers look normal",
    "Nothing in your readings is out of range",
)
RISK_WORDS = {"low": "low", "low_medium": "low-medium", "medium": "medium", "high": "high"}
SAFETY_NETS = (
    "If you feel worse or are worried, contact your care team.",
    "If anything changes or you feel unwell, contact your care team.",
)


def _normal_values(window: Sequence[Vitals], rng: random.Random) -> str:
    """Two of the window's vitals, quoted as the block writes them ("heart rate: 72 /min now,
    range 66-80 /min"): the same tokens as the prompt, so quoting them is copying."""
    parts = [f"{label}: {text}" for _, label, text in vital_lines(window)]
    rng.shuffle(parts)
    return "; ".join(parts[:2])


def _readback(window: Sequence[Vitals], asked: str | None) -> str:
    """The answer to "what is my heart rate?" (or, `asked` None, "what are my numbers?"): the
    block's own lines, read back whole."""
    lines = {name: f"{label}: {text}" for name, label, text in vital_lines(window)}
    if asked is None:
        return "Your watch shows " + "; ".join(lines.values()) + "."
    if asked in lines:
        return f"Your watch shows {lines[asked]}."
    return f"Your devices sent no {_LABELS[asked]} readings."


def risk_sentence(triage: Triage, rng: random.Random) -> str:
    n = triage.news2
    if n.score is None:
        return "No early-warning score can be computed without readings."
    risk = RISK_WORDS[str(n.risk)]
    return rng.choice(
        (
            f"Your early-warning score is NEWS2 {n.score}, {risk} risk.",
            f"The early-warning score (NEWS2) is {n.score}: {risk} risk.",
            f"NEWS2 is {n.score}, which means {risk} risk.",
        )
    )


def answer(
    topic: str,
    window: Sequence[Vitals],
    triage: Triage,
    found: list[Finding],
    rng: random.Random,
    asked: str | None = None,
) -> str:
    parts = [rng.choice(OPENERS[topic])]
    if topic == "readings" and window:
        parts.append(_readback(window, asked))
    if not window:
        parts.append("I have no recent readings from your devices, so I cannot check your numbers.")
    elif found:
        said = [rng.choice(f.phrases) for f in found[:CITED]]
        text = "; ".join(said)
        parts.append(text[0].upper() + text[1:] + ".")
    elif topic != "readings":  # a read-back has quoted the numbers already
        values = _normal_values(window, rng)
        parts.append(rng.choice(NORMAL_LEADS) + (f": {values}." if values else "."))
    else:
        parts.append(rng.choice(NORMAL_LEADS) + ".")
    parts.append(risk_sentence(triage, rng))
    sentence = escalation(triage, CLINICAL)
    if sentence is not None:
        parts.append(sentence)
    else:
        parts.append(rng.choice(SELF_CARE[topic]))
        parts.append(rng.choice(SAFETY_NETS))
    return " ".join(parts)


def reasoning(window: Sequence[Vitals], triage: Triage, found: list[Finding]) -> str:
    if not window:
        lines = ["No readings in the window."]
    elif found:
        lines = [
            f"{f.name.replace('_', ' ')}: {cited(f.value)}" if f.value is not None else f.name
            for f in found
        ]
        lines = ["Abnormal: " + "; ".join(lines) + "."]
    else:
        lines = ["All readings in range."]
    lines.append(triage_line(triage))
    severity = triage.severity
    due = escalation(triage, CLINICAL) is not None
    lines.append(f"Escalate: {severity}." if due else "No escalation due.")
    return "\n".join(lines)


READINGS_SHARE = 0.2
"""Of the dialogues, those whose wearer asks for the numbers themselves. Reading a line back
exactly is the skill every grounded answer needs (quoting "SpO2: 89 % now, lowest 88 %"
rather than a plausible 93 %), and these answers are dense in it."""


def _topic(rng: random.Random, scenario: Scenario) -> str:
    if rng.random() < READINGS_SHARE:
        return "readings"
    if scenario.topics and rng.random() < 0.6:
        return rng.choice(scenario.topics)
    return rng.choice(tuple(t for t in QUESTIONS if t != "readings"))


def dialogue(rng: random.Random) -> dict[str, Any]:
    scenario = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
    window = make_window(rng, scenario)
    triage = assess(window, CLINICAL.red_flags)
    block = vitals_context(window, triage, WINDOW_S, lambda text: len(text.split()), 4096)
    topic = _topic(rng, scenario)
    question = rng.choice(QUESTIONS[topic])
    asked = READBACK.get(question) if topic == "readings" else None
    found = findings(window, triage)
    text = answer(topic, window, triage, found, rng, asked)
    # Half with a reasoning block, half with the empty one the daemon's enable_thinking=false
    # template writes: the model answers well either way.
    think = reasoning(window, triage, found) if rng.random() < 0.5 else ""
    due = escalation(triage, CLINICAL)
    return {
        "messages": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": user_message(question, block)},
            {"role": "assistant", "content": f"<think>\n{think}\n</think>\n\n{text}"},
        ],
        "meta": {
            "scenario": scenario.name,
            "topic": topic,
            "news2": triage.news2.score,
            "risk": triage.news2.risk,
            "red_flags": list(triage.flag_names),
            "cite": [cited(f.value) for f in found[:CITED] if f.value is not None],
            "escalation": due,
            "question": question,
            "vitals_block": block,
        },
    }


# -- multiple choice --------------------------------------------------------------------------

_RISK_OPTIONS = ("low risk", "low-medium risk", "medium risk", "high risk", "no score")
_NO_ACTION = "No action is needed: the readings are in the usual range."
_UNSAFE = "Take an extra dose of your usual medicine."


def _mcq_answer(kind: str, triage: Triage) -> str:
    if kind == "risk":
        n = triage.news2
        return "no score" if n.score is None else f"{RISK_WORDS[str(n.risk)]} risk"
    due = escalation(triage, CLINICAL)
    return due if due is not None else _NO_ACTION


def mcq(rng: random.Random) -> dict[str, Any]:
    """A MedQA-style item about reading a window: its risk band, or what to do. The right
    answers are balanced (a target is drawn first, then a window that has it), so always
    guessing the commonest answer scores about chance."""
    kind = rng.choice(("risk", "action"))
    options = list(_RISK_OPTIONS) if kind == "risk" else [*CLINICAL.escalation.values(), _NO_ACTION]
    target = rng.choice(options[:4])  # "no score" and the unsafe option are never right
    for _ in range(500):
        scenario = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
        window = make_window(rng, scenario)
        triage = assess(window, CLINICAL.red_flags)
        if window and _mcq_answer(kind, triage) == target:
            break
    right = _mcq_answer(kind, triage)
    block = vitals_context(window, triage, WINDOW_S, lambda text: len(text.split()), 4096)
    block = block.rsplit("\n", 1)[0]  # without the triage line: that would give it away
    if kind == "risk":
        question = f"{block}\nWhat is the wearer's NEWS2 risk?"
    else:
        question = f"{block}\nWhat should the wearer be told?"
        options.append(_UNSAFE)
    rng.shuffle(options)
    letters = "ABCDE"
    return {
        "question": question,
        "options": dict(zip(letters, options, strict=True)),
        "answer": letters[options.index(right)],
        "answer_text": right,
    }


def mcq_chat(item: dict[str, Any]) -> dict[str, Any]:
    """An MCQ item as a training dialogue, in the format `edged model eval` scores: the
    assistant answers with the letter and the option's text."""
    return {
        "messages": [
            {"role": "user", "content": mcq_user_message(item)},
            {"role": "assistant", "content": mcq_answer(item["answer"], item["answer_text"])},
        ]
    }


# -- reading the block back ------------------------------------------------------------------

# -- files -----------------------------------------------------------------------------------


@dataclass
class Split:
    name: str
    count: int
    seed: int
    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)


def build(out: Path, train: int, heldout: int, mcq_train: int, mcq_test: int) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    splits = (
        Split("train", train, SEED, "dialogue"),
        Split("heldout", heldout, SEED + 1, "dialogue"),
        Split("mcq_train", mcq_train, SEED + 2, "mcq"),
        Split("mcq_test", mcq_test, SEED + 3, "mcq"),
    )
    counts = {}
    for split in splits:
        rng = random.Random(split.seed)
        make = {"dialogue": dialogue, "mcq": mcq}[split.kind]
        with (out / f"{split.name}.jsonl").open("w") as f:
            written = 0
            while written < split.count:
                row = make(rng)
                if row is not None:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    written += 1
        counts[split.name] = split.count
    (out / "corpus.json").write_text(json.dumps({"seed": SEED, "counts": counts}, indent=2))
    return counts


def write_eval_set(out: Path, dialogues: int, items: int, calibration: int) -> None:
    """The small held-out set `edged model eval` uses by default (package data): the first
    rows of the held-out splits, whose seeds no training split shares; and the first rows of
    the training split as calibration text for quantizers (GPTQ, llama.cpp's imatrix), so that
    no quantizer is calibrated on the text it is scored on."""
    out.mkdir(parents=True, exist_ok=True)
    for name, seed, count, make in (
        ("heldout", SEED + 1, dialogues, dialogue),
        ("mcq", SEED + 3, items, mcq),
        ("calibration", SEED, calibration, dialogue),
    ):
        rng = random.Random(seed)
        rows = [json.dumps(make(rng), ensure_ascii=False) for _ in range(count)]
        (out / f"{name}.jsonl").write_text("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for the JSONL splits")
    ap.add_argument(
        "--eval-set",
        action="store_true",
        help=f"write the bundled eval set instead ({DATA_DIR}: 150 dialogues, 200 MCQ items, "
        "32 calibration dialogues)",
    )
    ap.add_argument("--train", type=int, default=30000, help="training dialogues")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out dialogues")
    ap.add_argument("--mcq-train", type=int, default=6000, help="MCQ items to train on")
    ap.add_argument("--mcq-test", type=int, default=500, help="held-out MCQ items")
    args = ap.parse_args(argv)
    if args.eval_set:
        write_eval_set(DATA_DIR, 150, 200, 32)
        print(json.dumps({"out": str(DATA_DIR), "heldout": 150, "mcq": 200, "calibration": 32}))
        return 0
    if args.out is None:
        ap.error("--out is required (or --eval-set)")
    counts = build(args.out, args.train, args.heldout, args.mcq_train, args.mcq_test)
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
