"""Deterministic triage of a wearer's window: NEWS2 plus wearable red flags.

Pure functions over plain data: no clock, no I/O. The vitals path (alerts) and the model path
(advice) both call `assess`, so an alert and an answer given at the same moment agree.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from edged.clinical.news2 import News2Input, News2Score, risk_rank, score_news2
from edged.clinical.window import WindowSummary, summarize
from edged.config.models import RedFlagConfig
from edged.domain import RedFlagName, Risk, Severity, Vitals

_LOW_MEDIUM = Risk.LOW_MEDIUM.rank
# Device events that are red flags by themselves; other event names are kept but not flagged.
EVENT_FLAGS = (RedFlagName.FALL, RedFlagName.IRREGULAR_RHYTHM)


@dataclass(frozen=True)
class RedFlag:
    name: RedFlagName
    severity: Severity
    detail: str
    """Plain-language reason, with the values: goes to the wearer's own topics, never to logs."""


@dataclass(frozen=True)
class Triage:
    news2: News2Score
    red_flags: tuple[RedFlag, ...]
    readings: int
    """Summaries in the window that this triage is based on."""

    @property
    def severity(self) -> Severity | None:
        """The higher of the NEWS2 risk (when it is not `low`) and the worst red flag."""
        candidates: list[str] = [flag.severity for flag in self.red_flags]
        if self.news2.risk is not None and self.news2.risk != Risk.LOW:
            candidates.append(self.news2.risk.value)
        # Every candidate is low_medium or above: a Severity.
        return cast("Severity | None", max(candidates, key=risk_rank, default=None))

    @property
    def flag_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.red_flags)

    @property
    def alerting(self) -> bool:
        """API.md: an alert is raised at risk low_medium or above, or on any red flag."""
        return risk_rank(self.news2.risk) >= _LOW_MEDIUM or bool(self.red_flags)


def _summary(window: Sequence[Vitals] | WindowSummary) -> WindowSummary:
    return window if isinstance(window, WindowSummary) else summarize(window)


def news2_input(window: Sequence[Vitals] | WindowSummary) -> News2Input:
    """The window's worst values per parameter. Both extremes are passed for parameters scored
    in both directions (pulse, respiration, blood pressure, temperature, and SpO2 on scale 2
    with oxygen); the scorer keeps whichever scores higher."""
    w = _summary(window)

    def extremes(name: str) -> tuple[float, ...]:
        return (w.lows[name], w.highs[name]) if name in w.lows else ()

    return News2Input(
        resp_rate=extremes("resp_rate"),
        spo2=extremes("spo2"),
        systolic_bp=extremes("systolic_bp"),
        heart_rate=extremes("heart_rate"),
        temp_c=extremes("temp_c"),
        consciousness=w.consciousness,
        # Any oxygen in the window counts: it scores, and it changes the scale-2 bands.
        on_oxygen=w.on_oxygen,
        # The latest scale a gateway reported: it is a prescription, set by a clinician.
        spo2_scale=w.spo2_scale,
    )


def red_flags(window: Sequence[Vitals] | WindowSummary, cfg: RedFlagConfig) -> tuple[RedFlag, ...]:
    w = _summary(window)
    flags: list[RedFlag] = []

    def flag(name: RedFlagName, detail: str) -> None:
        flags.append(RedFlag(name, cfg.severity(name), detail))

    if w.spo2_highest_low is not None and w.spo2_highest_low < cfg.spo2_low_below:
        flag(
            RedFlagName.SPO2_LOW,
            f"SpO2 below {cfg.spo2_low_below:g} % in every reading of the window "
            f"(lowest {w.lows['spo2']:g} %)",
        )
    if w.resting_hr_high is not None and w.resting_hr_high > cfg.resting_tachycardia_above:
        flag(
            RedFlagName.RESTING_TACHYCARDIA,
            f"heart rate {w.resting_hr_high:g} /min at rest "
            f"(above {cfg.resting_tachycardia_above:g})",
        )
    slowest = w.lows.get("heart_rate")
    if slowest is not None and slowest < cfg.bradycardia_below:
        flag(
            RedFlagName.BRADYCARDIA,
            f"heart rate {slowest:g} /min (below {cfg.bradycardia_below:g})",
        )
    hottest = w.highs.get("temp_c")
    if hottest is not None and hottest >= cfg.fever_at_or_above:
        flag(
            RedFlagName.FEVER, f"temperature {hottest:g} °C (at or above {cfg.fever_at_or_above:g})"
        )
    for name in EVENT_FLAGS:
        if name in w.events:
            flag(name, f"the device reported {name.replace('_', ' ')}")
    rising = _resting_hr_rise(w.resting_hr, cfg)
    if rising is not None:
        latest, baseline = rising
        flag(
            RedFlagName.RESTING_HR_RISING,
            f"resting heart rate {latest:g} /min against the wearer's own "
            f"baseline of {baseline:g} (+{(latest / baseline - 1) * 100:.0f} %)",
        )
    return tuple(flags)


def _resting_hr_rise(resting: Sequence[float], cfg: RedFlagConfig) -> tuple[float, float] | None:
    """(latest, baseline) when the latest resting heart rate exceeds the median of the earlier
    resting readings by more than the configured percentage."""
    if len(resting) < cfg.resting_hr_min_baseline + 1:
        return None
    latest, baseline = resting[-1], statistics.median(resting[:-1])
    if baseline > 0 and latest > baseline * (1 + cfg.resting_hr_rise_pct / 100):
        return latest, baseline
    return None


def assess(window: Sequence[Vitals] | WindowSummary, cfg: RedFlagConfig) -> Triage:
    w = _summary(window)
    return Triage(score_news2(news2_input(w)), red_flags(w, cfg), w.readings)
