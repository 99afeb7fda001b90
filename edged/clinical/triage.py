"""Deterministic triage of a wearer's window: NEWS2 plus wearable red flags.

Pure functions over plain data: no clock, no I/O. The vitals path (alerts) and the model path
(advice) both call `assess`, so an alert and an answer given at the same moment agree.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from edged.clinical.news2 import News2Input, News2Score, max_risk, risk_rank, score_news2
from edged.config.models import RedFlagConfig
from edged.mqtt.messages import Vitals, VitalStat

RESTING = ("rest", "sleep")
# Device events that are red flags by themselves; other event names are kept but not flagged.
EVENT_FLAGS = ("fall", "irregular_rhythm")


@dataclass(frozen=True)
class RedFlag:
    name: str
    severity: str
    detail: str
    """Plain-language reason, with the values: goes to the wearer's own topics, never to logs."""


@dataclass(frozen=True)
class Triage:
    news2: News2Score
    red_flags: tuple[RedFlag, ...]
    readings: int
    """Summaries in the window that this triage is based on."""

    @property
    def severity(self) -> str | None:
        """The higher of the NEWS2 risk (when it is not `low`) and the worst red flag."""
        risk = self.news2.risk if self.news2.risk != "low" else None
        for flag in self.red_flags:
            risk = max_risk(risk, flag.severity)
        return risk

    @property
    def flag_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.red_flags)

    @property
    def alerting(self) -> bool:
        """API.md: an alert is raised at risk low_medium or above, or on any red flag."""
        return risk_rank(self.news2.risk) >= risk_rank("low_medium") or bool(self.red_flags)


def _stats(window: Sequence[Vitals], field: str) -> list[VitalStat]:
    return [s for v in window if (s := getattr(v, field)) is not None]


def _extremes(stats: list[VitalStat]) -> tuple[float, ...]:
    if not stats:
        return ()
    return (min(s.worst_low for s in stats), max(s.worst_high for s in stats))


def news2_input(window: Sequence[Vitals]) -> News2Input:
    """The window's worst values per parameter. Both extremes are passed for parameters scored
    in both directions (pulse, respiration, blood pressure, temperature, and SpO2 on scale 2
    with oxygen); the scorer keeps whichever scores higher."""
    oxygen = [v.on_oxygen for v in window if v.on_oxygen is not None]
    scales = [v.spo2_scale for v in window if v.spo2_scale is not None]
    consciousness = tuple(v.consciousness for v in window if v.consciousness is not None)
    return News2Input(
        resp_rate=_extremes(_stats(window, "resp_rate")),
        spo2=_extremes(_stats(window, "spo2")),
        systolic_bp=_extremes(_stats(window, "systolic_bp")),
        heart_rate=_extremes(_stats(window, "heart_rate")),
        temp_c=_extremes(_stats(window, "temp_c")),
        consciousness=consciousness,
        # Any oxygen in the window counts: it scores, and it changes the scale-2 bands.
        on_oxygen=any(oxygen) if oxygen else None,
        # The latest scale a gateway reported: it is a prescription, set by a clinician.
        spo2_scale=scales[-1] if scales else 1,
    )


def red_flags(window: Sequence[Vitals], cfg: RedFlagConfig) -> tuple[RedFlag, ...]:
    flags: list[RedFlag] = []

    def flag(name: str, detail: str) -> None:
        flags.append(RedFlag(name, cfg.severity(name), detail))

    spo2 = _stats(window, "spo2")
    if spo2 and all(s.worst_low < cfg.spo2_low_below for s in spo2):
        lowest = min(s.worst_low for s in spo2)
        flag(
            "spo2_low",
            f"SpO2 below {cfg.spo2_low_below:g} % in every reading of the window "
            f"(lowest {lowest:g} %)",
        )

    resting_fast = [
        v.heart_rate.worst_high
        for v in window
        if v.heart_rate is not None
        and v.activity in RESTING
        and v.heart_rate.worst_high > cfg.resting_tachycardia_above
    ]
    if resting_fast:
        flag(
            "resting_tachycardia",
            f"heart rate {max(resting_fast):g} /min at rest "
            f"(above {cfg.resting_tachycardia_above:g})",
        )

    heart = _stats(window, "heart_rate")
    slow = [s.worst_low for s in heart if s.worst_low < cfg.bradycardia_below]
    if slow:
        flag("bradycardia", f"heart rate {min(slow):g} /min (below {cfg.bradycardia_below:g})")

    hot = [s.worst_high for s in _stats(window, "temp_c") if s.worst_high >= cfg.fever_at_or_above]
    if hot:
        flag("fever", f"temperature {max(hot):g} °C (at or above {cfg.fever_at_or_above:g})")

    events = {e for v in window for e in v.events}
    for name in EVENT_FLAGS:
        if name in events:
            flag(name, f"the device reported {name.replace('_', ' ')}")

    rising = _resting_hr_rise(window, cfg)
    if rising is not None:
        latest, baseline = rising
        flag(
            "resting_hr_rising",
            f"resting heart rate {latest:g} /min against the wearer's own "
            f"baseline of {baseline:g} (+{(latest / baseline - 1) * 100:.0f} %)",
        )
    return tuple(flags)


def _resting_hr_rise(window: Sequence[Vitals], cfg: RedFlagConfig) -> tuple[float, float] | None:
    """(latest, baseline) when the latest resting heart rate exceeds the median of the earlier
    resting readings by more than the configured percentage."""
    resting = [
        v.heart_rate.central for v in window if v.heart_rate is not None and v.activity in RESTING
    ]
    if len(resting) < cfg.resting_hr_min_baseline + 1:
        return None
    latest, baseline = resting[-1], statistics.median(resting[:-1])
    if baseline > 0 and latest > baseline * (1 + cfg.resting_hr_rise_pct / 100):
        return latest, baseline
    return None


def assess(window: Sequence[Vitals], cfg: RedFlagConfig) -> Triage:
    return Triage(score_news2(news2_input(window)), red_flags(window, cfg), len(window))
