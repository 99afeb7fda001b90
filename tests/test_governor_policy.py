"""The governor's policy: bands, hysteresis, dwell, critical, memory headroom. Pure functions."""

from __future__ import annotations

import pytest

from edged.governor.policy import (
    PROFILE_BANDS,
    GovernorInput,
    GovernorPolicy,
    ThermalBands,
    ThermalState,
    decide,
    next_state,
    pause_after_step,
    preferred_cores,
)

# Pure functions, cheap under emulation: part of the ARM subset (tools/arm64_check.sh).
pytestmark = pytest.mark.arm64

BANDS = ThermalBands(warm_c=70.0, hot_c=78.0, critical_c=85.0, hysteresis_c=3.0, dwell_s=10.0)
POLICY = GovernorPolicy.for_profile("generic", max_threads=4)
POLICY = GovernorPolicy(bands=BANDS, max_threads=4, settings=POLICY.settings)


def _run(temps: list[tuple[float, float | None]], bands: ThermalBands = BANDS) -> list[str]:
    state: ThermalState | None = None
    out = []
    for t, temp in temps:
        state = next_state(state, GovernorInput(temp_c=temp), bands, t)
        out.append(state.state)
    return out


@pytest.mark.parametrize(
    ("temp", "state"),
    [
        (20.0, "nominal"),
        (69.9, "nominal"),
        (70.0, "warm"),
        (77.9, "warm"),
        (78.0, "hot"),
        (84.9, "hot"),
        (85.0, "critical"),
        (110.0, "critical"),
    ],
)
def test_bands_from_a_cold_start(temp: float, state: str) -> None:
    assert _run([(0, temp)]) == [state]


def test_heating_is_acted_on_at_once_even_within_the_dwell() -> None:
    assert _run([(0, 60), (1, 71), (2, 79), (3, 86)]) == ["nominal", "warm", "hot", "critical"]


def test_hysteresis_keeps_the_band_until_a_few_degrees_below_its_entry() -> None:
    # Entered warm at 70; 68 and 67.1 are inside the hysteresis, 66.9 is out.
    states = _run([(0, 71), (20, 68), (40, 67.1), (60, 66.9)])
    assert states == ["warm", "warm", "warm", "nominal"]


def test_dwell_holds_a_state_even_when_cold() -> None:
    states = _run([(0, 80), (5, 50), (9.9, 50), (10.0, 50)])
    assert states == ["hot", "hot", "hot", "nominal"]


def test_cooling_steps_only_as_far_as_the_hysteresis_shifted_temperature() -> None:
    # From critical at 86 to 80 after the dwell: 80 + 3 = 83 is still in "hot".
    assert _run([(0, 86), (20, 80)]) == ["critical", "hot"]


def test_a_temperature_hovering_at_a_threshold_never_oscillates() -> None:
    temps = [(t * 1.0, 70.0 + (0.4 if t % 2 else -0.4)) for t in range(60)]
    states = _run(temps)
    changes = sum(1 for a, b in zip(states, states[1:], strict=False) if a != b)
    assert changes == 1 and states[-1] == "warm"  # into warm once, then it stays


def test_missing_temperature_holds_the_state() -> None:
    assert _run([(0, 80), (30, None), (60, None)]) == ["hot", "hot", "hot"]
    assert _run([(0, None)]) == ["nominal"]


def test_firmware_throttling_forces_at_least_hot() -> None:
    state = next_state(None, GovernorInput(temp_c=60.0, firmware_throttling=True), BANDS, 0)
    assert state.state == "hot"


def test_decisions_per_state() -> None:
    nominal, _ = decide(None, GovernorInput(temp_c=40.0), POLICY, 0)
    assert (nominal.threads, nominal.idle_fraction, nominal.model_available) == (4, 0.0, True)
    warm, _ = decide(None, GovernorInput(temp_c=72.0), POLICY, 0)
    assert warm.threads == 4 and warm.idle_fraction > 0  # all cores, with a duty cycle
    hot, _ = decide(None, GovernorInput(temp_c=80.0), POLICY, 0)
    assert hot.threads == 2 and hot.idle_fraction > warm.idle_fraction
    assert hot.max_new_tokens == 128
    critical, _ = decide(None, GovernorInput(temp_c=90.0), POLICY, 0)
    assert not critical.model_available and critical.accept_queries
    assert "90.0 °C" in critical.reason


def test_memory_headroom_refuses_queries_and_shrinks_the_context() -> None:
    plenty, _ = decide(None, GovernorInput(temp_c=40.0, mem_headroom_mb=4000), POLICY, 0)
    assert plenty.accept_queries and plenty.context_cap is None
    tight, _ = decide(None, GovernorInput(temp_c=40.0, mem_headroom_mb=400), POLICY, 0)
    assert tight.accept_queries and tight.context_cap == 512
    short, _ = decide(None, GovernorInput(temp_c=40.0, mem_headroom_mb=100), POLICY, 0)
    assert not short.accept_queries and short.context_cap == 512
    unknown, _ = decide(None, GovernorInput(temp_c=40.0, mem_headroom_mb=None), POLICY, 0)
    assert unknown.accept_queries


def test_profile_bands_rise_and_stay_below_firmware_throttling() -> None:
    for name, bands in PROFILE_BANDS.items():
        assert bands.warm_c < bands.hot_c < bands.critical_c, name
    assert PROFILE_BANDS["pi5"].critical_c < 80 and PROFILE_BANDS["pi4"].critical_c < 80


def test_bands_that_do_not_rise_are_refused() -> None:
    with pytest.raises(ValueError, match="thermal bands must rise"):
        ThermalBands(warm_c=80, hot_c=70, critical_c=90)


def test_preferred_cores_put_big_cores_first_and_config_wins() -> None:
    rk3588 = {c: 414 for c in range(4)} | {c: 1024 for c in range(4, 8)}
    assert preferred_cores([], rk3588) == (4, 5, 6, 7, 0, 1, 2, 3)
    # Every Pi and Jetson: one core type, no preference; nor without capacities (x86).
    assert preferred_cores([], {c: 1024 for c in range(4)}) == ()
    assert preferred_cores([], {}) == ()
    assert preferred_cores([6, 7], rk3588) == (6, 7)


@pytest.mark.parametrize(
    ("step_s", "idle", "floor_s", "pause_s"),
    [
        (0.030, 0.2, 0.0, 0.0075),  # 30 ms step, idle 20 % of the time: 7.5 ms rest
        (0.003, 0.2, 0.0, 0.00075),  # a 10x faster model rests 10x less: same duty cycle
        (0.300, 0.5, 0.0, 0.300),
        (0.030, 0.0, 0.0, 0.0),
        (0.030, 0.0, 0.010, 0.010),  # the configured floor (governor.pause_ms)
        (0.030, 0.2, 0.010, 0.010),
        (-1.0, 0.2, 0.0, 0.0),
    ],
)
def test_pause_after_step_keeps_the_idle_fraction_whatever_the_step_time(
    step_s: float, idle: float, floor_s: float, pause_s: float
) -> None:
    pause = pause_after_step(step_s, idle, floor_s)
    assert pause == pytest.approx(pause_s)
    if step_s > 0 and pause > floor_s:
        assert pause / (pause + step_s) == pytest.approx(idle)


@pytest.mark.parametrize("idle", [-0.1, 1.0, 1.5])
def test_pause_after_step_refuses_an_impossible_fraction(idle: float) -> None:
    with pytest.raises(ValueError, match=f"idle_fraction = {idle}"):
        pause_after_step(0.03, idle)
