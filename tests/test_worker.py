"""The worker's decisions as pure functions: generation settings from config, query and the
governor's decision, and the advice payload from the guard's output and the result."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from edged.clinical.advice import guard
from edged.clinical.triage import assess
from edged.config.models import ClinicalConfig, ModelConfig
from edged.domain import GovernorState, Priority, Query, Vitals, VitalStat
from edged.engine import GenerationResult, Timing
from edged.governor.policy import GovernorDecision, GovernorInput, GovernorPolicy, decide
from edged.mqtt.routing import ReplyRoute
from edged.scheduler import Job
from edged.service.outcomes import QueryWork
from edged.service.worker import (
    AnswerContext,
    advice_reply,
    draft_phrases,
    generation_settings,
    prompt_budget,
)

pytestmark = pytest.mark.arm64

MODEL = ModelConfig.model_validate({"path": "/m", "temperature": 0.7, "top_k": 20})
QUERY = Query("q1", "hi", 200, False, Priority.NORMAL, None, True, None)
POLICY = GovernorPolicy.for_profile("generic", max_threads=4)


def _decision(temp_c: float, headroom_mb: float | None = None) -> GovernorDecision:
    reading = GovernorInput(temp_c=temp_c, mem_headroom_mb=headroom_mb)
    return decide(None, reading, POLICY, 0.0)[0]


def test_a_cool_board_generates_what_the_query_asks_with_the_models_sampling() -> None:
    settings = generation_settings(MODEL, QUERY, _decision(40.0))
    assert settings.max_new_tokens == 200 and settings.max_context is None
    assert (settings.temperature, settings.top_k) == (0.7, 20)
    assert settings.reasoning_budget == MODEL.reasoning_budget


def test_a_hot_board_caps_the_answer_but_never_lengthens_it() -> None:
    hot = _decision(85.0)
    assert hot.state == GovernorState.HOT and hot.max_new_tokens == 128
    assert generation_settings(MODEL, QUERY, hot).max_new_tokens == 128
    short = replace(QUERY, max_tokens=50)
    assert generation_settings(MODEL, short, hot).max_new_tokens == 50


def test_the_configured_sentences_are_offered_to_speculative_decoding() -> None:
    sentences = {"low_medium": "Tell your nurse.", "medium": "Call 111.", "high": "Call 112 now."}
    clinical = ClinicalConfig.model_validate({"escalation": sentences})
    phrases = draft_phrases(clinical)
    assert "Call 112 now." in phrases and clinical.disclaimer in phrases
    assert generation_settings(MODEL, QUERY, _decision(40.0), phrases).draft_phrases == phrases


def test_tight_memory_caps_the_context() -> None:
    assert generation_settings(MODEL, QUERY, _decision(40.0, headroom_mb=400)).max_context == 512


def test_the_prompt_leaves_room_for_the_whole_answer_within_the_context() -> None:
    cool = generation_settings(MODEL, QUERY, _decision(40.0))
    assert prompt_budget(cool, 1024) == 1024 - 200
    tight = generation_settings(MODEL, QUERY, _decision(40.0, headroom_mb=400))
    assert prompt_budget(tight, 1024) == 512 - 200  # the governor's memory cap is the limit
    assert prompt_budget(tight, 256) == 256 - 200


def test_the_advice_carries_the_guard_the_usage_and_the_times() -> None:
    triage = assess([Vitals(ts=1.7e9, spo2=VitalStat(mean=86))], ClinicalConfig().red_flags)
    advice = guard(triage, "Sit down and rest.", ClinicalConfig())
    job = Job("w1", "q1", Priority.NORMAL, 200, 10.0, None, QueryWork(QUERY, ReplyRoute("t", None)))
    timing = Timing(100.0, 150.0, 900.0, 50.0, 20.0)
    result = GenerationResult("Sit down and rest.", "", "stop", 40, 12, 30, (1,) * 12, timing)
    ctx = AnswerContext("node-1", "tiny", "int4", 2, "nominal")
    body = json.loads(
        advice_reply(job, advice, "stop", result, ctx, started=10.5, ended=11.5, history_turns=3)
    )
    assert body["text"] == "Sit down and rest." and body["escalation"] == advice.escalation
    assert body["escalation"] is not None  # SpO2 86: high risk, whatever the model wrote
    assert body["triage"]["red_flags"] == ["spo2_low"]
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 12, "history_turns": 3}
    assert body["timing_ms"] == {"queued": 500, "first_token": 650, "total": 1500}
    assert body["governor"] == {"threads": 2, "state": "nominal"}
    assert body["model"] == {"name": "tiny", "quant": "int4"}
    degraded = json.loads(
        advice_reply(job, advice, "degraded", None, ctx, 10.5, 11.0, history_turns=None)
    )
    # No model ran, so no turn was read: null like the token counts, not 0 (which would
    # read as "every turn dropped for the context").
    usage = {"prompt_tokens": None, "completion_tokens": None, "history_turns": None}
    assert degraded["usage"] == usage
    assert degraded["timing_ms"]["first_token"] is None
