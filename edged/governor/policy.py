"""The governor's policy: from sensor readings to how hard inference may run. Pure functions.

States, coolest first: `nominal`, `warm`, `hot`, `critical`. Heating is acted on at once: the
state jumps to the band the temperature is in. Cooling is acted on only when the temperature is
`hysteresis_c` below the band's entry point *and* the state has lasted `dwell_s`, so a board
hovering at a threshold never oscillates. `critical` pauses the model entirely (queries get
triage-only `degraded` answers; alerts never depend on the model). Memory is separate from
temperature: below `min_headroom_mb` new queries are refused with `busy`, and below
`shrink_context_below_mb` the KV context is capped.

The duty cycle is a fraction of time, not a pause in milliseconds: after each decode step the
cores rest `idle_fraction / (1 - idle_fraction)` times as long as the step took, so the same
setting cools a board alike whether a step takes 3 ms (a toy model) or 300 ms (4B on a Pi 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edged.domain import BoardProfile, GovernorState

STATES: tuple[GovernorState, ...] = tuple(GovernorState)


@dataclass(frozen=True)
class ThermalBands:
    warm_c: float
    hot_c: float
    critical_c: float
    hysteresis_c: float = 3.0
    """A band is left only this many degrees below where it is entered."""
    dwell_s: float = 15.0
    """Minimum time in a state before moving to a cooler one."""

    def __post_init__(self) -> None:
        if not self.warm_c < self.hot_c < self.critical_c:
            raise ValueError(
                f"thermal bands must rise: warm_c = {self.warm_c}, hot_c = {self.hot_c}, "
                f"critical_c = {self.critical_c}"
            )
        if self.hysteresis_c < 0 or self.dwell_s < 0:
            raise ValueError("hysteresis_c and dwell_s must be >= 0")

    def entry(self, state: GovernorState) -> float:
        return {
            GovernorState.WARM: self.warm_c,
            GovernorState.HOT: self.hot_c,
            GovernorState.CRITICAL: self.critical_c,
        }.get(state, float("-inf"))

    def band(self, temp_c: float) -> GovernorState:
        for state in reversed(STATES[1:]):
            if temp_c >= self.entry(state):
                return state
        return GovernorState.NOMINAL


# Defaults per board, with a margin below where the firmware itself throttles (the point of the
# governor is to never get there): Raspberry Pi 4 and 5 firmware starts throttling the ARM
# clock at 80 °C (Raspberry Pi documentation, "Frequency management and thermal control");
# Jetson Orin modules throttle near 99 °C (NVIDIA Jetson Orin thermal design guide); a generic
# x86 box is given Intel's usual ~90 °C package limit. Per-board tuning belongs in the fleet
# config's profiles.
PROFILE_BANDS: dict[BoardProfile, ThermalBands] = {
    BoardProfile.PI4: ThermalBands(warm_c=70.0, hot_c=75.0, critical_c=78.0),
    BoardProfile.PI5: ThermalBands(warm_c=71.0, hot_c=76.0, critical_c=79.0),
    BoardProfile.JETSON_ORIN_NANO: ThermalBands(warm_c=80.0, hot_c=88.0, critical_c=95.0),
    BoardProfile.GENERIC: ThermalBands(warm_c=75.0, hot_c=83.0, critical_c=90.0),
}


@dataclass(frozen=True)
class StateSettings:
    threads: int | None
    """None = every allowed thread."""
    idle_fraction: float
    """Share of the time the cores rest between decode steps: the duty cycle (0 = none)."""
    max_new_tokens: int | None
    """Cap on a query's tokens in this state; None = the query's own."""


@dataclass(frozen=True)
class GovernorPolicy:
    bands: ThermalBands
    max_threads: int
    settings: dict[GovernorState, StateSettings]
    min_headroom_mb: float = 256.0
    shrink_context_below_mb: float = 512.0
    shrunk_context: int = 512

    @classmethod
    def for_profile(cls, profile: str, max_threads: int) -> GovernorPolicy:
        try:
            bands = PROFILE_BANDS[BoardProfile(profile)]
        except ValueError:
            bands = PROFILE_BANDS[BoardProfile.GENERIC]
        return cls(
            bands=bands,
            max_threads=max_threads,
            settings={
                GovernorState.NOMINAL: StateSettings(None, idle_fraction=0.0, max_new_tokens=None),
                # Warm: every core, but a duty cycle; the board sheds heat between steps.
                GovernorState.WARM: StateSettings(None, idle_fraction=0.2, max_new_tokens=None),
                # Hot: half the cores, a longer pause and shorter answers.
                GovernorState.HOT: StateSettings(
                    threads=max(1, max_threads // 2), idle_fraction=0.35, max_new_tokens=128
                ),
                GovernorState.CRITICAL: StateSettings(1, idle_fraction=0.0, max_new_tokens=0),
            },
        )


@dataclass(frozen=True)
class GovernorInput:
    """What the policy needs from the sensors (a subset of `sensors.Readings`)."""

    temp_c: float | None
    firmware_throttling: bool = False
    """The board's own firmware is throttling right now (Raspberry Pi get_throttled)."""
    mem_headroom_mb: float | None = None
    cpus: int | None = None
    """CPUs the daemon may use (affinity, reduced by the cgroup CPU quota): a ceiling on
    threads, so a `CPUQuota=` unit is not oversubscribed. None = unknown."""


@dataclass(frozen=True)
class ThermalState:
    """The governor's memory between readings: its state and when it was entered."""

    state: GovernorState
    entered_at: float


@dataclass(frozen=True)
class GovernorDecision:
    """How hard inference may run, until the next reading. One immutable value, published to
    the worker, the status and the metrics at once."""

    state: GovernorState
    threads: int
    idle_fraction: float
    max_new_tokens: int | None
    model_available: bool
    accept_queries: bool
    context_cap: int | None
    reason: str


def next_state(
    prev: ThermalState | None, reading: GovernorInput, bands: ThermalBands, now: float
) -> ThermalState:
    current = prev.state if prev else GovernorState.NOMINAL
    # No reading is no evidence of cooling: hold the state (but honour the firmware).
    target = current if reading.temp_c is None else bands.band(reading.temp_c)
    if reading.firmware_throttling and target.rank < GovernorState.HOT.rank:
        target = GovernorState.HOT  # the firmware is already cutting the clock: back off hard
    if target.rank > current.rank:
        return ThermalState(target, now)
    if target == current or prev is None or reading.temp_c is None:
        return prev or ThermalState(current, now)
    # Cooling: only below the current band's entry minus the hysteresis, after the dwell, and
    # only as far as the hysteresis-shifted temperature allows.
    if reading.temp_c > bands.entry(current) - bands.hysteresis_c:
        return prev
    if now - prev.entered_at < bands.dwell_s:
        return prev
    cooler = bands.band(reading.temp_c + bands.hysteresis_c)
    if cooler.rank >= current.rank:
        return prev
    return ThermalState(cooler, now)


def decide(
    prev: ThermalState | None, reading: GovernorInput, policy: GovernorPolicy, now: float
) -> tuple[GovernorDecision, ThermalState]:
    state = next_state(prev, reading, policy.bands, now)
    settings = policy.settings[state.state]
    headroom = reading.mem_headroom_mb
    short = headroom is not None and headroom < policy.min_headroom_mb
    tight = headroom is not None and headroom < policy.shrink_context_below_mb
    temp = "unknown" if reading.temp_c is None else f"{reading.temp_c:.1f} °C"
    mem = "unknown" if headroom is None else f"{headroom:.0f} MB"
    reason = f"temperature {temp}, memory headroom {mem}"
    if reading.firmware_throttling:
        reason += ", firmware throttling"
    ceiling = policy.max_threads if reading.cpus is None else min(policy.max_threads, reading.cpus)
    if ceiling < policy.max_threads:
        reason += f", CPU quota {reading.cpus} cores"
    return (
        GovernorDecision(
            state=state.state,
            threads=max(1, min(ceiling, settings.threads or ceiling)),
            idle_fraction=settings.idle_fraction,
            max_new_tokens=settings.max_new_tokens,
            model_available=state.state != GovernorState.CRITICAL,
            accept_queries=not short,
            context_cap=policy.shrunk_context if tight else None,
            reason=reason,
        ),
        state,
    )


def preferred_cores(configured: Sequence[int], capacities: Mapping[int, int]) -> tuple[int, ...]:
    """The order in which inference takes cores when it uses fewer than all of them: the
    configured list (model.prefer_cores) if any, else the fastest first by the kernel's
    cpu_capacity, so that on a big.LITTLE board narrowing keeps the big cores. Equal
    capacities (every Pi and Jetson) give no preference: ()."""
    if configured:
        return tuple(configured)
    if len(set(capacities.values())) < 2:
        return ()
    return tuple(sorted(capacities, key=lambda cpu: (-capacities[cpu], cpu)))


def pause_after_step(step_s: float, idle_fraction: float, floor_s: float = 0.0) -> float:
    """Seconds to rest after a decode step that took `step_s`, so that the cores are idle
    `idle_fraction` of the time; never less than `floor_s` (governor.pause_ms)."""
    if not 0.0 <= idle_fraction < 1.0:
        raise ValueError(f"idle_fraction = {idle_fraction} must be in [0, 1)")
    return max(floor_s, max(0.0, step_s) * idle_fraction / (1.0 - idle_fraction))
