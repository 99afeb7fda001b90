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

STATES = ("nominal", "warm", "hot", "critical")


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

    def entry(self, state: str) -> float:
        return {"warm": self.warm_c, "hot": self.hot_c, "critical": self.critical_c}.get(
            state, float("-inf")
        )

    def band(self, temp_c: float) -> str:
        for state in reversed(STATES[1:]):
            if temp_c >= self.entry(state):
                return state
        return "nominal"


# Defaults per board, with a margin below where the firmware itself throttles (the point of the
# governor is to never get there): Raspberry Pi 4 and 5 firmware starts throttling the ARM
# clock at 80 °C (Raspberry Pi documentation, "Frequency management and thermal control");
# Jetson Orin modules throttle near 99 °C (NVIDIA Jetson Orin thermal design guide); a generic
# x86 box is given Intel's usual ~90 °C package limit. Per-board tuning belongs in the fleet
# config's profiles.
PROFILE_BANDS: dict[str, ThermalBands] = {
    "pi4": ThermalBands(warm_c=70.0, hot_c=75.0, critical_c=78.0),
    "pi5": ThermalBands(warm_c=71.0, hot_c=76.0, critical_c=79.0),
    "jetson-orin-nano": ThermalBands(warm_c=80.0, hot_c=88.0, critical_c=95.0),
    "generic": ThermalBands(warm_c=75.0, hot_c=83.0, critical_c=90.0),
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
    settings: dict[str, StateSettings]
    min_headroom_mb: float = 256.0
    shrink_context_below_mb: float = 512.0
    shrunk_context: int = 512

    @classmethod
    def for_profile(cls, profile: str, max_threads: int) -> GovernorPolicy:
        return cls(
            bands=PROFILE_BANDS.get(profile, PROFILE_BANDS["generic"]),
            max_threads=max_threads,
            settings={
                "nominal": StateSettings(threads=None, idle_fraction=0.0, max_new_tokens=None),
                # Warm: every core, but a duty cycle; the board sheds heat between steps.
                "warm": StateSettings(threads=None, idle_fraction=0.2, max_new_tokens=None),
                # Hot: half the cores, a longer pause and shorter answers.
                "hot": StateSettings(
                    threads=max(1, max_threads // 2), idle_fraction=0.35, max_new_tokens=128
                ),
                "critical": StateSettings(threads=1, idle_fraction=0.0, max_new_tokens=0),
            },
        )


@dataclass(frozen=True)
class GovernorInput:
    """What the policy needs from the sensors (a subset of `sensors.Readings`)."""

    temp_c: float | None
    firmware_throttling: bool = False
    """The board's own firmware is throttling right now (Raspberry Pi get_throttled)."""
    mem_headroom_mb: float | None = None


@dataclass(frozen=True)
class GovernorState:
    state: str
    entered_at: float


@dataclass(frozen=True)
class GovernorDecision:
    state: str
    threads: int
    idle_fraction: float
    max_new_tokens: int | None
    model_available: bool
    accept_queries: bool
    context_cap: int | None
    reason: str


def next_state(
    prev: GovernorState | None, reading: GovernorInput, bands: ThermalBands, now: float
) -> GovernorState:
    current = prev.state if prev else "nominal"
    # No reading is no evidence of cooling: hold the state (but honour the firmware).
    target = current if reading.temp_c is None else bands.band(reading.temp_c)
    if reading.firmware_throttling and STATES.index(target) < STATES.index("hot"):
        target = "hot"  # the firmware is already cutting the clock: back off hard
    if STATES.index(target) > STATES.index(current):
        return GovernorState(target, now)
    if target == current or prev is None or reading.temp_c is None:
        return prev or GovernorState(current, now)
    # Cooling: only below the current band's entry minus the hysteresis, after the dwell, and
    # only as far as the hysteresis-shifted temperature allows.
    if reading.temp_c > bands.entry(current) - bands.hysteresis_c:
        return prev
    if now - prev.entered_at < bands.dwell_s:
        return prev
    cooler = bands.band(reading.temp_c + bands.hysteresis_c)
    if STATES.index(cooler) >= STATES.index(current):
        return prev
    return GovernorState(cooler, now)


def decide(
    prev: GovernorState | None, reading: GovernorInput, policy: GovernorPolicy, now: float
) -> tuple[GovernorDecision, GovernorState]:
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
    return (
        GovernorDecision(
            state=state.state,
            threads=min(policy.max_threads, settings.threads or policy.max_threads),
            idle_fraction=settings.idle_fraction,
            max_new_tokens=settings.max_new_tokens,
            model_available=state.state != "critical",
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
