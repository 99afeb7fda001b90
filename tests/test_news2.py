"""NEWS2 against the RCP 2017 charts: every band edge, rounding, aggregates, risk, gaps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from decimal import Decimal
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.clinical import news2
from edged.clinical.news2 import (
    PARAMETERS,
    RISK_ORDER,
    News2Input,
    News2Score,
    max_risk,
    risk_rank,
    score_consciousness,
    score_heart_rate,
    score_news2,
    score_on_oxygen,
    score_resp_rate,
    score_spo2,
    score_systolic_bp,
    score_temp_c,
)

# Pure Python and cheap under emulation: part of the ARM subset (tools/arm64_check.sh).
pytestmark = pytest.mark.arm64

# A set of observations scoring 0 everywhere (RCP NEWS2 2017, chart 1), on air.
NORMAL = News2Input(
    resp_rate=(16,),
    spo2=(97,),
    systolic_bp=(120,),
    heart_rate=(70,),
    temp_c=(37.0,),
    consciousness=("alert",),
    on_oxygen=False,
)


# Band edges, both sides, RCP NEWS2 2017, chart 1.


@pytest.mark.parametrize(
    ("rate", "points"),
    [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3)],
)
def test_resp_rate_band_edges(rate: float, points: int) -> None:
    assert score_resp_rate(rate) == points


@pytest.mark.parametrize(
    ("spo2", "points"),
    [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0)],
)
@pytest.mark.parametrize("on_oxygen", [False, True])
def test_spo2_scale_1_band_edges_ignore_oxygen(spo2: float, points: int, on_oxygen: bool) -> None:
    assert score_spo2(spo2) == points
    assert score_spo2(spo2, scale=1, on_oxygen=on_oxygen) == points


@pytest.mark.parametrize(
    ("spo2", "points"),
    [(83, 3), (84, 2), (85, 2), (86, 1), (87, 1), (88, 0), (92, 0), (93, 0), (100, 0)],
)
def test_spo2_scale_2_band_edges_on_air(spo2: float, points: int) -> None:
    assert score_spo2(spo2, scale=2, on_oxygen=False) == points


@pytest.mark.parametrize(
    ("spo2", "points"),
    [
        (83, 3),
        (84, 2),
        (85, 2),
        (86, 1),
        (87, 1),
        (88, 0),
        (92, 0),
        (93, 1),
        (94, 1),
        (95, 2),
        (96, 2),
        (97, 3),
        (100, 3),
    ],
)
def test_spo2_scale_2_band_edges_on_oxygen(spo2: float, points: int) -> None:
    assert score_spo2(spo2, scale=2, on_oxygen=True) == points


@pytest.mark.parametrize(("on_oxygen", "points"), [(True, 2), (False, 0)])
def test_oxygen_scores_2_and_air_0(on_oxygen: bool, points: int) -> None:
    assert score_on_oxygen(on_oxygen) == points


@pytest.mark.parametrize(
    ("sbp", "points"),
    [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)],
)
def test_systolic_bp_band_edges(sbp: float, points: int) -> None:
    assert score_systolic_bp(sbp) == points


@pytest.mark.parametrize(
    ("pulse", "points"),
    [
        (40, 3),
        (41, 1),
        (50, 1),
        (51, 0),
        (90, 0),
        (91, 1),
        (110, 1),
        (111, 2),
        (130, 2),
        (131, 3),
    ],
)
def test_heart_rate_band_edges(pulse: float, points: int) -> None:
    assert score_heart_rate(pulse) == points


@pytest.mark.parametrize(
    ("level", "points"),
    [("alert", 0), ("new_confusion", 3), ("voice", 3), ("pain", 3), ("unresponsive", 3)],
)
def test_consciousness_alert_scores_0_and_cvpu_3(level: str, points: int) -> None:
    assert score_consciousness(level) == points


@pytest.mark.parametrize(
    ("temp", "points"),
    [
        (35.0, 3),
        (35.1, 1),
        (36.0, 1),
        (36.1, 0),
        (38.0, 0),
        (38.1, 1),
        (39.0, 1),
        (39.1, 2),
    ],
)
def test_temp_c_band_edges(temp: float, points: int) -> None:
    assert score_temp_c(temp) == points


# Continuous wearable values are rounded half up to the chart's resolution, then banded.


@pytest.mark.parametrize(
    ("scorer", "value", "points"),
    [
        (score_heart_rate, 90.4, 0),  # -> 90
        (score_heart_rate, 90.5, 1),  # -> 91, not 90 as round() would give
        (score_heart_rate, 50.5, 0),  # -> 51
        (score_heart_rate, 40.49, 3),  # -> 40
        (score_resp_rate, 20.5, 2),  # -> 21
        (score_resp_rate, 8.5, 1),  # -> 9, where round() gives 8
        (score_systolic_bp, 219.5, 3),  # -> 220
        (score_systolic_bp, 90.49, 3),  # -> 90
        (score_spo2, 95.5, 0),  # -> 96
        (score_spo2, 91.5, 2),  # -> 92, where round() gives 92 too
        (score_temp_c, 38.05, 1),  # -> 38.1 although the float is just below 38.05
        (score_temp_c, 38.04, 0),  # -> 38.0
        (score_temp_c, 35.04, 3),  # -> 35.0
        (score_temp_c, 35.05, 1),  # -> 35.1
        (score_temp_c, 39.05, 2),  # -> 39.1
        (score_temp_c, 36.05, 0),  # -> 36.1
    ],
)
def test_values_are_rounded_half_up_to_chart_resolution(
    scorer: Callable[[float], int], value: float, points: int
) -> None:
    assert scorer(value) == points


def test_spo2_scale_2_rounds_before_choosing_the_oxygen_band() -> None:
    assert score_spo2(92.4, scale=2, on_oxygen=True) == 0
    assert score_spo2(92.5, scale=2, on_oxygen=True) == 1


@pytest.mark.parametrize(
    "table",
    [
        news2.RESP_RATE_BANDS,
        news2.SPO2_SCALE_1_BANDS,
        news2.SPO2_SCALE_2_AIR_BANDS,
        news2.SPO2_SCALE_2_OXYGEN_BANDS,
        news2.SYSTOLIC_BP_BANDS,
        news2.HEART_RATE_BANDS,
        news2.TEMP_C_BANDS,
    ],
)
def test_band_tables_are_open_ended_and_contiguous_at_their_resolution(
    table: tuple[news2.Band, ...],
) -> None:
    step = news2.TENTH if table is news2.TEMP_C_BANDS else news2.WHOLE
    assert table[0][0] is None and table[-1][1] is None
    for (_, high, _), (low, _, _) in pairwise(table):
        assert high is not None and low is not None
        assert Decimal(low) - Decimal(high) == step


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: score_consciousness("drowsy"), "consciousness = 'drowsy' is not one of alert"),
        (lambda: score_consciousness("Alert"), "consciousness = 'Alert'"),
        (lambda: score_spo2(95, scale=3), "spo2_scale = 3 is not one of 1, 2"),
        (lambda: score_heart_rate(float("nan")), "heart_rate = nan is not a finite number"),
        (lambda: score_temp_c(float("inf")), "temp_c = inf is not a finite number"),
        (lambda: News2Input(spo2_scale=0), "spo2_scale = 0 is not one of 1, 2"),
        (lambda: risk_rank("critical"), "risk = 'critical' is not one of low"),
    ],
)
def test_bad_values_raise_value_error_naming_field_and_value(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


@pytest.mark.parametrize(
    "kwargs",
    [{"heart_rate": 72.0}, {"consciousness": "alert"}, {"on_oxygen": 1}],
)
def test_news2_input_rejects_a_bare_value_where_candidates_belong(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        News2Input(**kwargs)


def test_booleans_are_not_vital_values() -> None:
    with pytest.raises(TypeError, match="heart_rate = True is not a number"):
        score_heart_rate(True)


# Aggregates and risk, RCP NEWS2 2017, chart 3.


def _with(**changes: Any) -> News2Input:
    return dataclasses.replace(NORMAL, **changes)


@pytest.mark.parametrize(
    ("inp", "score", "risk"),
    [
        (NORMAL, 0, "low"),
        (_with(temp_c=(38.5,)), 1, "low"),
        (_with(temp_c=(38.5,), heart_rate=(95,), resp_rate=(10,), spo2=(95,)), 4, "low"),
        (_with(consciousness=("voice",)), 3, "low_medium"),
        (_with(consciousness=("voice",), temp_c=(38.5,)), 4, "low_medium"),
        (_with(consciousness=("voice",), on_oxygen=True), 5, "medium"),
        (_with(on_oxygen=True, spo2=(93,), heart_rate=(95,)), 5, "medium"),
        (_with(on_oxygen=True, spo2=(93,), heart_rate=(115,)), 6, "medium"),
        (_with(resp_rate=(8,), on_oxygen=True, temp_c=(38.5,)), 6, "medium"),
        (_with(on_oxygen=True, spo2=(93,), heart_rate=(115,), temp_c=(38.5,)), 7, "high"),
        (
            News2Input(
                resp_rate=(30,),
                spo2=(85,),
                on_oxygen=True,
                systolic_bp=(80,),
                heart_rate=(140,),
                consciousness=("unresponsive",),
                temp_c=(34.0,),
            ),
            20,
            "high",
        ),
    ],
)
def test_aggregate_and_risk(inp: News2Input, score: int, risk: str) -> None:
    result = score_news2(inp)
    assert (result.score, result.risk) == (score, risk)
    assert sum(result.components.values()) == score
    assert result.missing == () and result.partial is False


def test_maximum_score_is_20_with_every_component_at_its_top() -> None:
    result = score_news2(
        News2Input(
            resp_rate=(30,),
            spo2=(85,),
            on_oxygen=True,
            systolic_bp=(80,),
            heart_rate=(140,),
            consciousness=("unresponsive",),
            temp_c=(34.0,),
        )
    )
    assert result.score == news2.MAX_SCORE == 20
    assert result.components == {
        "resp_rate": 3,
        "spo2": 3,
        "on_oxygen": 2,
        "systolic_bp": 3,
        "heart_rate": 3,
        "consciousness": 3,
        "temp_c": 3,
    }


def test_api_md_alert_example_scores_7_high_with_two_parameters_missing() -> None:
    result = score_news2(
        News2Input(resp_rate=(22,), spo2=(90,), on_oxygen=False, heart_rate=(95,), temp_c=(38.4,))
    )
    assert result.components == {
        "resp_rate": 2,
        "spo2": 3,
        "on_oxygen": 0,
        "heart_rate": 1,
        "temp_c": 1,
    }
    assert (result.score, result.risk) == (7, "high")
    assert result.missing == ("systolic_bp", "consciousness")
    assert result.partial is True
    assert result.summary() == (
        "NEWS2 7 (high risk); partial score: systolic_bp, consciousness not measured."
    )


# Worst of a window: the highest-scoring candidate counts, in either direction.


@pytest.mark.parametrize("pulses", [(38, 150), (150, 38), (38, 70), (70, 150)])
def test_worst_heart_rate_of_the_window_counts_in_both_directions(
    pulses: tuple[float, ...],
) -> None:
    assert score_news2(_with(heart_rate=pulses)).components["heart_rate"] == 3


@pytest.mark.parametrize("saturations", [(97, 90), (90, 97)])
def test_worst_spo2_of_the_window_counts(saturations: tuple[float, ...]) -> None:
    assert score_news2(_with(spo2=saturations)).components["spo2"] == 3


def test_scale_2_on_oxygen_scores_a_high_spo2_as_the_worst() -> None:
    inp = _with(spo2=(89, 97), on_oxygen=True, spo2_scale=2)
    assert score_news2(inp).components["spo2"] == 3
    assert score_news2(dataclasses.replace(inp, on_oxygen=False)).components["spo2"] == 0


def test_worst_consciousness_of_the_window_counts() -> None:
    result = score_news2(_with(consciousness=("alert", "new_confusion", "alert")))
    assert result.components["consciousness"] == 3


# Missing parameters are listed, never silently scored as 0.


def test_empty_input_has_no_score_and_every_parameter_missing() -> None:
    result = score_news2(News2Input())
    assert result == News2Score(None, None, {}, PARAMETERS, True)
    assert result.summary() == "NEWS2 not available: none of its vital signs was measured."


def test_on_oxygen_alone_is_not_a_measurement() -> None:
    result = score_news2(News2Input(on_oxygen=True))
    assert (result.score, result.risk, result.components) == (None, None, {})
    assert "on_oxygen" not in result.missing and len(result.missing) == 6


def test_only_pulse_scores_the_pulse_and_lists_the_other_six_missing() -> None:
    result = score_news2(News2Input(heart_rate=(115,)))
    assert result.score == 2
    assert result.risk == "low"
    assert result.components == {"on_oxygen": 0, "heart_rate": 2}
    assert result.missing == (
        "resp_rate",
        "spo2",
        "on_oxygen",
        "systolic_bp",
        "consciousness",
        "temp_c",
    )
    assert result.partial is True
    assert result.summary() == (
        "NEWS2 2 (low risk); partial score: resp_rate, spo2, systolic_bp, consciousness, temp_c "
        "not measured; on_oxygen unknown, scored as air."
    )


def test_unknown_oxygen_on_scale_2_bands_spo2_as_on_air_but_is_listed_missing() -> None:
    result = score_news2(_with(on_oxygen=None, spo2=(97,), spo2_scale=2))
    assert result.components["spo2"] == 0
    assert result.components["on_oxygen"] == 0
    assert result.missing == ("on_oxygen",)
    assert result.summary() == (
        "NEWS2 0 (low risk); partial score: on_oxygen unknown, scored as air."
    )


def test_a_partial_score_can_only_understate_the_full_one() -> None:
    full = score_news2(_with(systolic_bp=(85,), heart_rate=(95,), temp_c=(38.5,)))
    partial = score_news2(_with(systolic_bp=(), heart_rate=(95,), temp_c=(38.5,)))
    assert (full.score, full.risk) == (5, "medium")
    assert (partial.score, partial.risk, partial.missing) == (2, "low", ("systolic_bp",))


def test_components_follow_parameters_order() -> None:
    assert tuple(score_news2(NORMAL).components) == PARAMETERS


def test_low_medium_summary_reads_as_prose() -> None:
    result = score_news2(_with(consciousness=("pain",)))
    assert result.summary() == "NEWS2 3 (low-medium risk)."


# Risk ordering.


@pytest.mark.parametrize(
    ("a", "b", "higher"),
    [
        (None, None, None),
        (None, "low", "low"),
        ("low", None, "low"),
        ("low", "low_medium", "low_medium"),
        ("high", "medium", "high"),
        ("medium", "medium", "medium"),
    ],
)
def test_max_risk(a: str | None, b: str | None, higher: str | None) -> None:
    assert max_risk(a, b) == higher


def test_risk_rank_follows_risk_order_and_none_ranks_lowest() -> None:
    assert [risk_rank(r) for r in (None, *RISK_ORDER)] == [-1, 0, 1, 2, 3]


def test_consciousness_points_cover_exactly_the_contract_levels() -> None:
    from edged.mqtt.messages import CONSCIOUSNESS_LEVELS

    assert tuple(news2.CONSCIOUSNESS_POINTS) == CONSCIOUSNESS_LEVELS


# Any window of plausible readings (API.md ranges) scores, within 0-20, consistently.


def _candidates(low: float, high: float) -> st.SearchStrategy[tuple[float, ...]]:
    value = st.floats(low, high, allow_nan=False, allow_infinity=False) | st.integers(
        int(low), int(high)
    )
    return st.lists(value, max_size=3).map(tuple)


@given(
    resp_rate=_candidates(2, 80),
    spo2=_candidates(50, 100),
    systolic_bp=_candidates(40, 300),
    heart_rate=_candidates(20, 300),
    temp_c=_candidates(25, 45),
    consciousness=st.lists(st.sampled_from(list(news2.CONSCIOUSNESS_POINTS)), max_size=3).map(
        tuple
    ),
    on_oxygen=st.none() | st.booleans(),
    spo2_scale=st.sampled_from([1, 2]),
)
def test_any_plausible_window_scores_consistently(
    resp_rate: tuple[float, ...],
    spo2: tuple[float, ...],
    systolic_bp: tuple[float, ...],
    heart_rate: tuple[float, ...],
    temp_c: tuple[float, ...],
    consciousness: tuple[str, ...],
    on_oxygen: bool | None,
    spo2_scale: int,
) -> None:
    inp = News2Input(
        resp_rate=resp_rate,
        spo2=spo2,
        systolic_bp=systolic_bp,
        heart_rate=heart_rate,
        temp_c=temp_c,
        consciousness=consciousness,
        on_oxygen=on_oxygen,
        spo2_scale=spo2_scale,
    )
    result = score_news2(inp)

    expected_missing = tuple(
        name
        for name in PARAMETERS
        if (getattr(inp, name) is None if name == "on_oxygen" else not getattr(inp, name))
    )
    assert result.missing == expected_missing
    assert result.partial == bool(expected_missing)
    if len(expected_missing) - ("on_oxygen" in expected_missing) == 6:
        assert (result.score, result.risk, result.components) == (None, None, {})
        return

    assert result.score is not None
    assert 0 <= result.score <= 20
    assert result.score == sum(result.components.values())
    assert set(result.components) == set(PARAMETERS) - set(expected_missing) | {"on_oxygen"}
    assert all(0 <= p <= 3 for p in result.components.values())
    if result.score >= 7:
        expected_risk = "high"
    elif result.score >= 5:
        expected_risk = "medium"
    elif 3 in result.components.values():
        expected_risk = "low_medium"
    else:
        expected_risk = "low"
    assert result.risk == expected_risk
    assert result.summary().startswith(f"NEWS2 {result.score} (")


@pytest.mark.parametrize(
    ("scorer", "value", "points"),
    [
        (score_heart_rate, 1e308, 3),
        (score_heart_rate, -1e308, 3),
        (score_heart_rate, 10**400, 3),
        (score_temp_c, 5e-324, 3),
        (score_temp_c, np.float32(38.05), 1),  # its str is "38.05"; as a float 38.0499992...
        (score_temp_c, np.float64(38.05), 1),
        (score_heart_rate, np.int64(131), 3),
    ],
)
def test_any_finite_number_scores_including_numpy_scalars(
    scorer: Callable[[float], int], value: float, points: int
) -> None:
    assert scorer(value) == points
