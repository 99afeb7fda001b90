"""NEWS2, the National Early Warning Score 2, as pure functions over plain data.

Source: Royal College of Physicians. National Early Warning Score (NEWS) 2: Standardising the
assessment of acute-illness severity in the NHS. Updated report of a working party. London: RCP,
December 2017. Chart 1 (the NEWS2 scoring system) gives every scoring band here, SpO2 scale 2
included, which chart 2 (the observation chart) repeats; the clinical-risk bands are chart 3
(NEWS2 thresholds and triggers).

Decisions the chart leaves open (each is documented again at its code):
- Resolution. The chart bands whole numbers (respiration rate, SpO2, systolic BP, pulse) and
  tenths of a degree (temperature), while a wearable reports means such as 90.4 /min. A value
  is rounded to the chart's resolution, half up, as the decimal number it was written as, and
  then banded: 90.4 -> 90 -> 0 points, 90.5 -> 91 -> 1 point, 38.05 °C -> 38.1 -> 1 point,
  35.04 °C -> 35.0 -> 3 points. (`round()` rounds half to even, and the float nearest 38.05 lies
  just below it; neither is how a nurse reads a chart.)
- Worst of a window. Each parameter takes candidate values (callers pass e.g. the window's min
  and max) and the highest-scoring one counts. The worst values may come from different
  moments, so a window scores at least as high as any single set of observations in it:
  deliberately conservative.
- Missing parameters are never scored as 0 silently: they are listed in `missing` and the score
  is `partial`. The aggregate and the risk use only the parameters present, so a partial score
  can understate risk (never overstate it). Contract v1 (API.md) makes one exception: an
  unknown `on_oxygen` is scored as air (0 points, and SpO2 scale 2 is banded as on air) and is
  still listed in `missing`.
- No score without a measurement: when no parameter other than `on_oxygen` has data, there is
  no score, no risk and no components.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import TypeAlias

from edged.domain import Risk

PARAMETERS = (
    "resp_rate",
    "spo2",
    "on_oxygen",
    "systolic_bp",
    "heart_rate",
    "consciousness",
    "temp_c",
)
"""The NEWS2 parameters by their vitals field names, in contract v1 (API.md) order."""

RISK_ORDER: tuple[Risk, ...] = tuple(Risk)
"""Clinical risk names (contract v1), lowest first."""
_RISK_RANK: dict[str, int] = {risk.value: rank for rank, risk in enumerate(RISK_ORDER)}

MAX_SCORE = 20
"""RCP NEWS2 2017, chart 1: the highest aggregate (3 + 3 + 2 + 3 + 3 + 3 + 3)."""

Bound: TypeAlias = int | Decimal | None
Band: TypeAlias = tuple[Bound, Bound, int]
"""(lowest, highest, points): both bounds inclusive and at the chart's resolution; None = open."""

WHOLE = Decimal(1)
TENTH = Decimal("0.1")

# RCP NEWS2 2017, chart 1: respiration rate, per minute.
RESP_RATE_BANDS: tuple[Band, ...] = (
    (None, 8, 3),
    (9, 11, 1),
    (12, 20, 0),
    (21, 24, 2),
    (25, None, 3),
)

# RCP NEWS2 2017, chart 1: SpO2 scale 1, %. The default scale.
SPO2_SCALE_1_BANDS: tuple[Band, ...] = (
    (None, 91, 3),
    (92, 93, 2),
    (94, 95, 1),
    (96, None, 0),
)

# RCP NEWS2 2017, chart 1 (and chart 2): SpO2 scale 2, %, for a prescribed target of 88-92 %
# (hypercapnic respiratory failure). The chart's 0 column is "88-92, >=93 on air": on air,
# anything from 88 up scores 0; on oxygen, above 92 scores again (93-94 -> 1, 95-96 -> 2,
# >=97 -> 3) because over-oxygenation is the hazard.
SPO2_SCALE_2_AIR_BANDS: tuple[Band, ...] = (
    (None, 83, 3),
    (84, 85, 2),
    (86, 87, 1),
    (88, None, 0),
)
SPO2_SCALE_2_OXYGEN_BANDS: tuple[Band, ...] = (
    (None, 83, 3),
    (84, 85, 2),
    (86, 87, 1),
    (88, 92, 0),
    (93, 94, 1),
    (95, 96, 2),
    (97, None, 3),
)

# RCP NEWS2 2017, chart 1: "Air or oxygen?".
OXYGEN_POINTS = 2
AIR_POINTS = 0

# RCP NEWS2 2017, chart 1: systolic blood pressure, mmHg.
SYSTOLIC_BP_BANDS: tuple[Band, ...] = (
    (None, 90, 3),
    (91, 100, 2),
    (101, 110, 1),
    (111, 219, 0),
    (220, None, 3),
)

# RCP NEWS2 2017, chart 1: pulse, per minute.
HEART_RATE_BANDS: tuple[Band, ...] = (
    (None, 40, 3),
    (41, 50, 1),
    (51, 90, 0),
    (91, 110, 1),
    (111, 130, 2),
    (131, None, 3),
)

# RCP NEWS2 2017, chart 1: consciousness on the ACVPU scale ("Alert" 0, "CVPU" 3), where C is
# new confusion; keyed by the contract v1 `consciousness` values.
CONSCIOUSNESS_POINTS: dict[str, int] = {
    "alert": 0,
    "new_confusion": 3,
    "voice": 3,
    "pain": 3,
    "unresponsive": 3,
}

# RCP NEWS2 2017, chart 1: temperature, °C, to one decimal.
TEMP_C_BANDS: tuple[Band, ...] = (
    (None, Decimal("35.0"), 3),
    (Decimal("35.1"), Decimal("36.0"), 1),
    (Decimal("36.1"), Decimal("38.0"), 0),
    (Decimal("38.1"), Decimal("39.0"), 1),
    (Decimal("39.1"), None, 2),
)

# RCP NEWS2 2017, chart 3 (thresholds and triggers): aggregate 0-4 low; a single parameter
# scoring 3 (a "red score") low-medium; aggregate 5-6 medium; 7 or more high.
HIGH_RISK_FROM = 7
MEDIUM_RISK_FROM = 5
RED_SCORE = 3

_EXACT = Context(prec=400)
"""Enough digits to round any finite float (up to ~1.8e308) exactly: no overflow, no traps."""


def chart_value(name: str, value: float, resolution: Decimal) -> Decimal:
    """`value` rounded half up to `resolution`, as the decimal number it was written as.

    `str(38.05)` is "38.05", so the reading is rounded as sent rather than as its binary
    approximation (38.049999...). Raises ValueError for NaN and infinities, TypeError for
    non-numbers (booleans included), naming `name`.
    """
    kind = type(value)
    # The hot path (a plain float or int) skips the slow ABC check.
    if (kind is not float and kind is not int) and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{name} = {value!r} is not a number")
    if isinstance(value, int):
        return Decimal(value)  # already on every chart's grid, however large
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError(f"{name} = {value!r} is not a finite number")
    if as_float.is_integer():
        return Decimal(int(as_float))  # a whole number is on every chart's grid
    try:
        # str, not repr: numpy scalars print their shortest decimal there (np.float32(38.05)
        # is "38.05", though as a Python float it is 38.0499992...).
        exact = Decimal(str(value))
    except ArithmeticError:  # a Real without a decimal str, e.g. Fraction(181, 2)
        exact = Decimal(repr(as_float))
    return exact.quantize(resolution, rounding=ROUND_HALF_UP, context=_EXACT)


def band_points(value: Decimal, bands: tuple[Band, ...]) -> int:
    """The points of the band holding `value` (already at the chart's resolution)."""
    for low, high, points in bands:
        if (low is None or value >= low) and (high is None or value <= high):
            return points
    # Unreachable: every table is contiguous at its resolution (tests/test_news2.py checks).
    raise AssertionError(f"{value} falls between the bands {bands}")


@functools.lru_cache(maxsize=8192)
def _banded(
    name: str, kind: type, value: float, resolution: Decimal, bands: tuple[Band, ...]
) -> int:
    # Cached: wearables repeat the same few hundred readings, and Decimal rounding is the
    # largest cost of scoring a summary. `kind` keeps 1 and True (equal hashes) apart, so a
    # bool is still refused every time.
    return band_points(chart_value(name, value, resolution), bands)


def score_resp_rate(v: float) -> int:
    """Points for a respiration rate (per minute); RCP NEWS2 2017, chart 1."""
    return _banded("resp_rate", type(v).__name__, v, WHOLE, RESP_RATE_BANDS)


def score_spo2(v: float, scale: int = 1, on_oxygen: bool = False) -> int:
    """Points for an SpO2 (%) on `scale` 1 or 2; RCP NEWS2 2017, chart 1.

    `on_oxygen` matters on scale 2 only (it chooses the bands above 92 %); the oxygen's own
    points are a separate parameter (`score_on_oxygen`). Raises ValueError for another scale.
    """
    if scale == 1:
        bands = SPO2_SCALE_1_BANDS
    elif scale == 2:
        bands = SPO2_SCALE_2_OXYGEN_BANDS if on_oxygen else SPO2_SCALE_2_AIR_BANDS
    else:
        raise ValueError(f"spo2_scale = {scale!r} is not one of 1, 2")
    return _banded("spo2", type(v).__name__, v, WHOLE, bands)


def score_on_oxygen(on_oxygen: bool) -> int:
    """Points for supplemental oxygen (2) or air (0); RCP NEWS2 2017, chart 1."""
    return OXYGEN_POINTS if on_oxygen else AIR_POINTS


def score_systolic_bp(v: float) -> int:
    """Points for a systolic blood pressure (mmHg); RCP NEWS2 2017, chart 1."""
    return _banded("systolic_bp", type(v).__name__, v, WHOLE, SYSTOLIC_BP_BANDS)


def score_heart_rate(v: float) -> int:
    """Points for a pulse (per minute); RCP NEWS2 2017, chart 1."""
    return _banded("heart_rate", type(v).__name__, v, WHOLE, HEART_RATE_BANDS)


def score_consciousness(level: str) -> int:
    """Points for a consciousness level (ACVPU); RCP NEWS2 2017, chart 1.

    Raises ValueError naming the value when it is not a contract v1 level.
    """
    points = CONSCIOUSNESS_POINTS.get(level) if isinstance(level, str) else None
    if points is None:
        raise ValueError(
            f"consciousness = {level!r} is not one of {', '.join(CONSCIOUSNESS_POINTS)}"
        )
    return points


def score_temp_c(v: float) -> int:
    """Points for a temperature (°C, rounded to 0.1); RCP NEWS2 2017, chart 1."""
    return _banded("temp_c", type(v).__name__, v, TENTH, TEMP_C_BANDS)


@dataclass(frozen=True)
class News2Input:
    """The worst values of a window, per parameter; an empty tuple = not measured in the window.

    Raises TypeError when a candidates field is not a tuple (a bare number or a string would
    otherwise be misread) or `on_oxygen` is not a bool or None, and ValueError for a
    `spo2_scale` other than 1 or 2.
    """

    resp_rate: tuple[float, ...] = ()
    """Candidate values to score; the worst (highest-scoring) counts. Callers pass e.g.
    (window min, window max): pulse, respiration, blood pressure and temperature score in both
    directions, and so does SpO2 on scale 2 with oxygen."""
    spo2: tuple[float, ...] = ()
    systolic_bp: tuple[float, ...] = ()
    heart_rate: tuple[float, ...] = ()
    temp_c: tuple[float, ...] = ()
    consciousness: tuple[str, ...] = ()
    on_oxygen: bool | None = None
    """None = unknown: scored as air (0) and listed in `missing` (contract v1)."""
    spo2_scale: int = 1
    """1, or 2 when a clinician has prescribed the 88-92 % target (RCP NEWS2 2017, chart 1)."""

    def __post_init__(self) -> None:
        for name in PARAMETERS:
            if name != "on_oxygen" and not isinstance(getattr(self, name), tuple):
                raise TypeError(
                    f"News2Input.{name} = {getattr(self, name)!r} is not a tuple of candidates"
                )
        if self.on_oxygen is not None and not isinstance(self.on_oxygen, bool):
            raise TypeError(f"on_oxygen = {self.on_oxygen!r} is not a bool or None")
        if isinstance(self.spo2_scale, bool) or self.spo2_scale not in (1, 2):
            raise ValueError(f"spo2_scale = {self.spo2_scale!r} is not one of 1, 2")


@dataclass(frozen=True)
class News2Score:
    """A NEWS2 aggregate with its risk, its parts and what it lacks."""

    score: int | None
    """Aggregate (0-20) of the parameters present; None when no parameter was measured
    (`on_oxygen` alone is not a measurement)."""
    risk: Risk | None
    """low | low_medium | medium | high, from the parameters present only; None with no score."""
    components: dict[str, int] = field(hash=False)
    """Points per parameter present, keyed by vitals field name in `PARAMETERS` order. Holds
    `on_oxygen` whenever there is a score, as 0 when oxygen use is unknown (scored as air).
    Empty when there is no score; otherwise its values sum to `score`."""
    missing: tuple[str, ...]
    """Parameters with no data, in `PARAMETERS` order (an unknown `on_oxygen` included)."""
    partial: bool
    """True when anything is missing: the score may then understate the risk."""

    def summary(self) -> str:
        """One plain sentence for the wearer, such as
        `NEWS2 6 (medium risk); partial score: systolic_bp, consciousness not measured.`"""
        if self.score is None:
            return "NEWS2 not available: none of its vital signs was measured."
        parts = [f"NEWS2 {self.score} ({(self.risk or 'unknown').replace('_', '-')} risk)"]
        unmeasured = [name for name in self.missing if name != "on_oxygen"]
        notes = []
        if unmeasured:
            notes.append(f"{', '.join(unmeasured)} not measured")
        if "on_oxygen" in self.missing:
            notes.append("on_oxygen unknown, scored as air")
        if notes:
            parts.append("partial score: " + "; ".join(notes))
        return "; ".join(parts) + "."


def score_news2(inp: News2Input) -> News2Score:
    """The NEWS2 of a window: each parameter's worst candidate, summed; risk per chart 3.

    Raises ValueError/TypeError (naming the parameter and value) for a non-finite or
    non-numeric value or an unknown consciousness level; never for finite numbers.
    """
    on_oxygen = bool(inp.on_oxygen)  # unknown is scored as air (contract v1)
    scorers: dict[str, Callable[[float], int]] = {
        "resp_rate": score_resp_rate,
        "spo2": lambda v: score_spo2(v, inp.spo2_scale, on_oxygen),
        "systolic_bp": score_systolic_bp,
        "heart_rate": score_heart_rate,
        "temp_c": score_temp_c,
    }
    components: dict[str, int] = {}
    missing: list[str] = []
    for name in PARAMETERS:
        if name == "on_oxygen":
            if inp.on_oxygen is None:
                missing.append(name)
            components[name] = score_on_oxygen(on_oxygen)
            continue
        candidates = getattr(inp, name)
        if not candidates:
            missing.append(name)
        elif name == "consciousness":
            components[name] = max(score_consciousness(level) for level in candidates)
        else:
            components[name] = max(scorers[name](value) for value in candidates)

    if components.keys() == {"on_oxygen"}:
        return News2Score(None, None, {}, tuple(missing), True)
    score = sum(components.values())
    return News2Score(score, _risk(score, components), components, tuple(missing), bool(missing))


def _risk(score: int, components: dict[str, int]) -> Risk:
    # RCP NEWS2 2017, chart 3: the aggregate bands take precedence over a red score, so an
    # aggregate of 5 with a 3 in it is medium, not low-medium.
    if score >= HIGH_RISK_FROM:
        return Risk.HIGH
    if score >= MEDIUM_RISK_FROM:
        return Risk.MEDIUM
    if any(points >= RED_SCORE for points in components.values()):
        return Risk.LOW_MEDIUM
    return Risk.LOW


def risk_rank(risk: str | None) -> int:
    """Position of `risk` in `RISK_ORDER`; -1 for None. Raises ValueError for other names."""
    if risk is None:
        return -1
    try:
        return _RISK_RANK[risk]
    except KeyError:
        raise ValueError(f"risk = {risk!r} is not one of {', '.join(RISK_ORDER)}") from None


def max_risk(a: str | None, b: str | None) -> str | None:
    """The higher of two risks (None ranks below low); None only when both are None."""
    return a if risk_rank(a) >= risk_rank(b) else b
