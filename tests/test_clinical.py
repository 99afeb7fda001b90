"""The clinical layer's pure parts: vitals state, red flags, triage, alert gating, prompts."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.clinical.advice import (
    degraded_text,
    escalation,
    triage_line,
    user_message,
    vitals_context,
)
from edged.clinical.alerts import AlertGate, should_alert
from edged.clinical.state import VitalsState
from edged.clinical.triage import assess, news2_input, red_flags
from edged.clinical.window import summarize
from edged.config.models import ClinicalConfig, RedFlagConfig
from edged.domain import Vitals, VitalStat
from edged.mqtt.messages import parse_vitals
from edged.mqtt.payloads import alert_id, alert_payload

FLAGS = RedFlagConfig()
T0 = 1_764_064_800.0


def v(**fields: object) -> Vitals:
    return parse_vitals({"ts": T0, **fields}, now=T0)


NORMAL = v(
    heart_rate=72,
    spo2=98,
    resp_rate=14,
    temp_c=36.8,
    systolic_bp=122,
    consciousness="alert",
    on_oxygen=False,
    activity="rest",
)


# -- vitals state ---------------------------------------------------------------------------


def test_memory_stays_bounded_for_100k_summaries_from_20k_wearers() -> None:
    state = VitalsState(window_s=1800, max_wearers=10_000, max_per_wearer=20, ttl_s=3600)
    summary = v(heart_rate={"mean": 80, "min": 70, "max": 95}, spo2=97, resp_rate=16)
    tracemalloc.start()
    try:
        for i in range(50_000):
            state.add(f"w{i % 20_000:05d}", summary, T0 + i * 0.01)
        half, _ = tracemalloc.get_traced_memory()
        for i in range(50_000, 100_000):
            state.add(f"w{i % 20_000:05d}", summary, T0 + i * 0.01)
        full, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(state) == 10_000
    assert state.summaries() <= 10_000 * 20
    # Once the wearer cap is reached, twice the traffic costs no more memory.
    assert full < half * 1.1, (half, full)


def test_least_recently_seen_wearer_is_evicted() -> None:
    state = VitalsState(window_s=1800, max_wearers=2, max_per_wearer=5, ttl_s=3600)
    state.add("a", NORMAL, T0)
    state.add("b", NORMAL, T0 + 1)
    state.add("a", NORMAL, T0 + 2)
    state.add("c", NORMAL, T0 + 3)
    assert state.window("b", T0 + 3) == ()
    assert len(state.window("a", T0 + 3)) == 2 and len(state.window("c", T0 + 3)) == 1


def test_window_drops_old_summaries_and_caps_per_wearer() -> None:
    state = VitalsState(window_s=600, max_wearers=10, max_per_wearer=3, ttl_s=3600)
    for i in range(5):
        state.add("a", NORMAL, T0 + i)
    assert len(state.window("a", T0 + 5)) == 3
    assert state.window("a", T0 + 4 + 601) == ()


def test_silent_wearers_expire_after_the_ttl() -> None:
    state = VitalsState(window_s=60, max_wearers=100, max_per_wearer=3, ttl_s=120)
    state.add("quiet", NORMAL, T0)
    state.add("busy", NORMAL, T0 + 200)
    assert len(state) == 1


# -- red flags and triage --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "flag", "expected"),
    [
        ([v(spo2={"mean": 91, "min": 89.9})], "spo2_low", True),
        ([v(spo2={"mean": 91, "min": 90})], "spo2_low", False),
        ([v(spo2={"min": 88}), v(spo2=95)], "spo2_low", False),  # not sustained
        ([v(spo2={"min": 88}), v(spo2={"min": 86})], "spo2_low", True),
        ([v(heart_rate=121, activity="rest")], "resting_tachycardia", True),
        ([v(heart_rate=121, activity="sleep")], "resting_tachycardia", True),
        ([v(heart_rate=120, activity="rest")], "resting_tachycardia", False),
        ([v(heart_rate=150, activity="run")], "resting_tachycardia", False),
        ([v(heart_rate={"mean": 50, "min": 39})], "bradycardia", True),
        ([v(heart_rate=40)], "bradycardia", False),
        ([v(temp_c=39.1)], "fever", True),
        ([v(temp_c=39.0)], "fever", False),
        ([v(events=["fall"])], "fall", True),
        ([v(events=["irregular_rhythm"])], "irregular_rhythm", True),
        ([v(events=["button_press"])], "fall", False),
        (
            [v(heart_rate=60, activity="rest")] * 3 + [v(heart_rate=76, activity="rest")],
            "resting_hr_rising",
            True,
        ),
        (
            [v(heart_rate=60, activity="rest")] * 3 + [v(heart_rate=75, activity="rest")],
            "resting_hr_rising",
            False,
        ),  # exactly +25 % is not above it
        (
            [v(heart_rate=60, activity="rest")] * 2 + [v(heart_rate=90, activity="rest")],
            "resting_hr_rising",
            False,
        ),  # too little baseline
        (
            [v(heart_rate=60, activity="rest")] * 3 + [v(heart_rate=90, activity="walk")],
            "resting_hr_rising",
            False,
        ),  # walking is not resting
    ],
)
def test_red_flag_rules(window: list[Vitals], flag: str, expected: bool) -> None:
    names = [f.name for f in red_flags(window, FLAGS)]
    assert (flag in names) == expected


def test_red_flag_thresholds_and_severities_come_from_config() -> None:
    cfg = RedFlagConfig(fever_at_or_above=38.0, severities={"fever": "high"})
    (flag,) = red_flags([v(temp_c=38.2)], cfg)
    assert flag.name == "fever" and flag.severity == "high" and "38.2" in flag.detail


def test_unknown_red_flag_in_config_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown flag"):
        RedFlagConfig(severities={"sneezing": "high"})


def test_news2_uses_the_worst_of_the_window_in_both_directions() -> None:
    window = [
        v(heart_rate={"mean": 70, "min": 38}),
        v(heart_rate=150, spo2={"mean": 95, "min": 90}),
    ]
    inp = news2_input(window)
    assert min(inp.heart_rate) == 38 and max(inp.heart_rate) == 150
    assert min(inp.spo2) == 90
    score = assess(window, FLAGS).news2
    assert score.components["heart_rate"] == 3 and score.components["spo2"] == 3


def test_missing_parameters_are_listed_not_scored() -> None:
    triage = assess([v(heart_rate=72)], FLAGS)
    assert triage.news2.partial
    assert set(triage.news2.missing) == {
        "resp_rate",
        "spo2",
        "on_oxygen",
        "systolic_bp",
        "consciousness",
        "temp_c",
    }
    assert "partial" in triage_line(triage)


def test_severity_is_the_higher_of_risk_and_red_flags() -> None:
    assert assess([NORMAL], FLAGS).severity is None
    assert not assess([NORMAL], FLAGS).alerting
    spo2_low = assess([v(spo2=85, resp_rate=26)], FLAGS)
    assert spo2_low.news2.risk == "medium"  # 3 + 3
    assert spo2_low.severity == "high"  # spo2_low is a high red flag
    single_three = assess([v(resp_rate=26)], FLAGS)
    assert single_three.news2.risk == "low_medium" and single_three.alerting


# -- alerts ---------------------------------------------------------------------------------


def test_alert_gate_rate_limits_repeats_but_not_worsening() -> None:
    gate = AlertGate(cooldown_s=300, max_wearers=10)
    medium = assess([v(resp_rate=26, heart_rate=115)], FLAGS)  # 3 + 2 = 5
    high = assess([v(resp_rate=26, heart_rate=135, spo2=91)], FLAGS)
    normal = assess([NORMAL], FLAGS)
    assert medium.severity == "medium" and high.severity == "high"
    assert gate.check("w", medium, T0)
    assert not gate.check("w", medium, T0 + 60)  # same condition within the cooldown
    assert gate.check("w", high, T0 + 61)  # worse: at once
    assert not gate.check("w", high, T0 + 120)
    assert not gate.check("w", medium, T0 + 130)  # better than what was sent
    assert not gate.check("w", normal, T0 + 140)  # nothing to say
    assert not gate.check("w", high, T0 + 150)  # back to what was sent 89 s ago: rate-limited
    assert gate.check("w", high, T0 + 361)  # cooldown over: repeated
    assert gate.check("other", medium, T0 + 362)  # per wearer


def test_a_flickering_red_flag_does_not_alert_every_other_summary() -> None:
    gate = AlertGate(cooldown_s=300, max_wearers=10)
    fall = assess([v(events=["fall"])], FLAGS)
    fever = assess([v(temp_c=39.5)], FLAGS)
    assert gate.check("w", fall, T0)
    assert gate.check("w", fever, T0 + 1)  # a new flag: at once
    assert not gate.check("w", fall, T0 + 2)  # both already alerted within the cooldown
    assert not gate.check("w", fever, T0 + 3)


def test_a_new_red_flag_alerts_at_once_even_at_the_same_severity() -> None:
    fall = assess([v(events=["fall"])], FLAGS)
    both = assess([v(events=["fall"], spo2=85)], FLAGS)
    assert fall.severity == both.severity == "high"
    gate = AlertGate(cooldown_s=300, max_wearers=10)
    assert gate.check("w", fall, T0)
    assert gate.check("w", both, T0 + 1)


def test_should_alert_is_false_below_low_medium() -> None:
    assert not should_alert(None, assess([NORMAL], FLAGS), T0, 300)


def test_alert_payload_has_the_api_fields() -> None:
    triage = assess([v(spo2=85, resp_rate=26, events=["fall"])], FLAGS)
    alert = alert_payload("w1", T0, triage, alert_id="a1", node="n1")
    # API.md's fields, and `node` (a v1.1 addition: which member of a share group raised it).
    assert set(alert) == {
        "alert_id", "node", "wearer", "ts", "severity", "news2", "red_flags", "message"
    }  # fmt: skip
    assert set(alert["news2"]) == {"score", "risk", "missing", "components"}
    assert alert["severity"] == "high" and alert["red_flags"] == ["spo2_low", "fall"]
    assert alert["news2"]["components"] == {"resp_rate": 3, "spo2": 3, "on_oxygen": 0}
    assert "on_oxygen" in alert["news2"]["missing"]
    assert "Partial score" in alert["message"]


def test_alert_id_is_the_same_for_the_same_summary_and_differs_otherwise() -> None:
    # Every member of a share group, and this node after a redelivery, computes the same id.
    summary = b'{"ts": 1764064800, "spo2": 85}'
    assert alert_id("w1", summary) == alert_id("w1", summary)
    assert len({alert_id("w1", summary), alert_id("w2", summary), alert_id("w1", b"{}")}) == 3


# -- prompts and the guard --------------------------------------------------------------------


def _words(text: str) -> int:
    return len(text.split())


def test_vitals_context_fits_the_budget_and_keeps_the_triage() -> None:
    window = [
        NORMAL,
        v(
            heart_rate={"mean": 90, "min": 80, "max": 110},
            spo2=93,
            resp_rate=22,
            temp_c=38.3,
            systolic_bp=105,
            hrv_rmssd_ms=30,
            steps=40,
            activity="rest",
        ),
    ]
    triage = assess(window, FLAGS)
    full = vitals_context(window, triage, 1800, _words, budget=500)
    assert "heart rate: 90 /min now, range 72–110 /min" in full
    assert "SpO2: 93 % now, lowest 93 %" in full
    assert triage_line(triage) in full
    small = vitals_context(window, triage, 1800, _words, budget=40)
    assert _words(small) <= 40 or small.count("\n") == 1
    assert triage_line(triage) in small and "steps" not in small
    assert "SpO2" in small, "the least important lines go first"


def test_prompt_without_readings_says_so() -> None:
    triage = assess([], FLAGS)
    block = vitals_context([], triage, 1800, _words, budget=100)
    assert "No recent readings" in block and "not available" in block
    assert user_message("Am I ok?", block).endswith("Question: Am I ok?")
    assert user_message("Am I ok?", None) == "Am I ok?"


def test_escalation_whenever_risk_is_medium_or_high_or_a_flag_is_present() -> None:
    cfg = ClinicalConfig()
    assert escalation(assess([NORMAL], FLAGS), cfg) is None
    assert escalation(assess([v(resp_rate=26)], FLAGS), cfg) is None  # low_medium, no flag
    assert (
        escalation(assess([v(resp_rate=26, heart_rate=115)], FLAGS), cfg)
        == cfg.escalation["medium"]
    )
    assert (
        escalation(assess([v(resp_rate=26, heart_rate=135, spo2=91)], FLAGS), cfg)
        == cfg.escalation["high"]
    )
    resting_rise = [v(heart_rate=60, activity="rest")] * 3 + [v(heart_rate=80, activity="rest")]
    assert escalation(assess(resting_rise, FLAGS), cfg) == cfg.escalation["low_medium"]


def test_degraded_text_is_the_triage() -> None:
    triage = assess([v(spo2=85, resp_rate=26)], FLAGS)
    text = degraded_text(triage)
    assert "NEWS2 6" in text and "SpO2 below 90" in text
    assert "no recent readings" in degraded_text(assess([], FLAGS))


def test_vitalstat_from_bare_number_and_object() -> None:
    assert v(heart_rate=70).heart_rate == VitalStat(mean=70)
    assert v(heart_rate={"min": 60, "max": 80}).heart_rate.central == 70


# -- the incremental window ------------------------------------------------------------------

_vital = st.one_of(
    st.none(),
    st.floats(30, 200, allow_nan=False).map(lambda x: {"mean": round(x, 1)}),
    st.tuples(st.floats(30, 120), st.floats(0, 60)).map(
        lambda t: {"min": round(t[0], 1), "max": round(t[0] + t[1], 1)}
    ),
)
_summary = st.fixed_dictionaries(
    {
        "heart_rate": _vital,
        "resp_rate": st.one_of(st.none(), st.integers(4, 40)),
        "spo2": st.one_of(
            st.none(),
            st.integers(80, 100),
            st.integers(80, 100).map(lambda m: {"min": m, "mean": min(100, m + 2)}),
        ),
        "temp_c": st.one_of(st.none(), st.floats(34, 41).map(lambda x: round(x, 1))),
        "systolic_bp": st.one_of(st.none(), st.integers(70, 230)),
        "activity": st.sampled_from([None, "rest", "sleep", "walk"]),
        "on_oxygen": st.sampled_from([None, False, True]),
        "spo2_scale": st.sampled_from([None, 1, 2]),
        "consciousness": st.sampled_from([None, "alert", "voice"]),
        "events": st.sampled_from([[], ["fall"], ["irregular_rhythm", "fall"]]),
    }
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_summary, min_size=1, max_size=40), st.integers(1, 12))
def test_incremental_window_matches_scoring_the_whole_window(
    summaries: list[dict[str, object]], cap: int
) -> None:
    state = VitalsState(window_s=1800, max_wearers=10, max_per_wearer=cap, ttl_s=3600)
    for i, raw in enumerate(summaries):
        vitals = v(**{k: x for k, x in raw.items() if x is not None})
        incremental = state.add("w", vitals, T0 + i)
        window = state.window("w", T0 + i)
        assert len(window) == min(i + 1, cap)
        assert incremental == summarize(window)
        assert assess(incremental, FLAGS) == assess(window, FLAGS)


def test_window_summary_forgets_what_left_the_window() -> None:
    state = VitalsState(window_s=60, max_wearers=10, max_per_wearer=100, ttl_s=3600)
    state.add("w", v(spo2=85, events=["fall"], on_oxygen=True), T0)
    later = state.add("w", v(spo2=97, on_oxygen=False), T0 + 61)
    assert later.lows["spo2"] == 97 and later.events == frozenset()
    assert later.on_oxygen is False and later.readings == 1
