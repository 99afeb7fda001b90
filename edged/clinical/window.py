"""What triage needs to know about a window of vitals, kept up to date in O(1) per summary.

Scoring a summary must not cost more as a wearer's window fills: the vitals path has to keep
up with thousands of summaries a second on one core of a Pi. `WindowAggregate` keeps the
window's extremes with monotonic deques (the sliding-window minimum: each value enters and
leaves once) and counts for everything else, and hands out a `WindowSummary` — exactly what
`summarize()` computes from the whole window, which the tests check on random windows.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

from edged.domain import Vitals

NEWS2_NUMERIC = ("resp_rate", "spo2", "systolic_bp", "heart_rate", "temp_c")
RESTING = ("rest", "sleep")


@dataclass(frozen=True)
class WindowSummary:
    readings: int
    lows: dict[str, float]
    """Per NEWS2 numeric parameter: the lowest value of the window (min, else mean)."""
    highs: dict[str, float]
    """Per NEWS2 numeric parameter: the highest value of the window (max, else mean)."""
    spo2_highest_low: float | None
    """The highest per-reading SpO2 minimum: below a threshold means *every* reading was."""
    resting_hr_high: float | None
    """The highest heart rate seen while resting or asleep."""
    resting_hr: tuple[float, ...]
    """Central heart rate of each resting reading, oldest first (the trend rule's baseline)."""
    consciousness: tuple[str, ...]
    on_oxygen: bool | None
    spo2_scale: int
    events: frozenset[str]


def summarize(window: Sequence[Vitals]) -> WindowSummary:
    """The summary of a whole window, computed directly (the reference implementation)."""
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    for name in NEWS2_NUMERIC:
        stats = [s for v in window if (s := getattr(v, name)) is not None]
        if stats:
            lows[name] = min(s.worst_low for s in stats)
            highs[name] = max(s.worst_high for s in stats)
    spo2 = [v.spo2.worst_low for v in window if v.spo2 is not None]
    resting = [v.heart_rate for v in window if v.heart_rate is not None and v.activity in RESTING]
    oxygen = [v.on_oxygen for v in window if v.on_oxygen is not None]
    scales = [v.spo2_scale for v in window if v.spo2_scale is not None]
    return WindowSummary(
        readings=len(window),
        lows=lows,
        highs=highs,
        spo2_highest_low=max(spo2) if spo2 else None,
        resting_hr_high=max(s.worst_high for s in resting) if resting else None,
        resting_hr=tuple(s.central for s in resting),
        consciousness=tuple(sorted({v.consciousness for v in window if v.consciousness})),
        on_oxygen=any(oxygen) if oxygen else None,
        spo2_scale=scales[-1] if scales else 1,
        events=frozenset(e for v in window for e in v.events),
    )


class _SlidingMax:
    """Maximum of a sliding window: a deque of (seq, value) with decreasing values."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[tuple[int, float]] = deque()

    def push(self, seq: int, value: float) -> None:
        items = self._items
        while items and items[-1][1] <= value:
            items.pop()
        items.append((seq, value))

    def expire(self, first_seq: int) -> None:
        items = self._items
        while items and items[0][0] < first_seq:
            items.popleft()

    def value(self) -> float | None:
        return self._items[0][1] if self._items else None


class WindowAggregate:
    """The incremental twin of `summarize`, for one wearer's window."""

    __slots__ = (
        "_seq",
        "_first",
        "_vitals",
        "_max",
        "_neg_min",
        "_trackers",
        "_resting_seq",
        "_resting",
        "_events",
        "_levels",
        "_oxygen_known",
        "_oxygen_on",
        "_scales",
    )

    def __init__(self) -> None:
        self._seq = 0
        self._first = 0
        self._vitals: deque[Vitals] = deque()
        self._max = {name: _SlidingMax() for name in (*NEWS2_NUMERIC, "spo2_low", "resting_hr")}
        self._neg_min = {name: _SlidingMax() for name in NEWS2_NUMERIC}
        # Parallel deques, so the summary copies the values with one C-level tuple() call.
        self._resting_seq: deque[int] = deque()
        self._resting: deque[float] = deque()
        self._trackers = (*self._max.values(), *self._neg_min.values())
        self._events: Counter[str] = Counter()
        self._levels: Counter[str] = Counter()
        self._oxygen_known = 0
        self._oxygen_on = 0
        self._scales: deque[tuple[int, int]] = deque()

    def __len__(self) -> int:
        return len(self._vitals)

    def vitals(self) -> tuple[Vitals, ...]:
        return tuple(self._vitals)

    def push(self, v: Vitals) -> None:
        seq = self._seq
        self._seq += 1
        self._vitals.append(v)
        for name in NEWS2_NUMERIC:
            stat = getattr(v, name)
            if stat is not None:
                self._max[name].push(seq, stat.worst_high)
                self._neg_min[name].push(seq, -stat.worst_low)
        if v.spo2 is not None:
            self._max["spo2_low"].push(seq, v.spo2.worst_low)
        if v.heart_rate is not None and v.activity in RESTING:
            self._max["resting_hr"].push(seq, v.heart_rate.worst_high)
            self._resting_seq.append(seq)
            self._resting.append(v.heart_rate.central)
        if v.spo2_scale is not None:
            self._scales.append((seq, v.spo2_scale))
        self._count(v, 1)

    def pop_oldest(self) -> None:
        v = self._vitals.popleft()
        self._first += 1
        first = self._first
        for tracker in self._trackers:
            items = tracker._items
            while items and items[0][0] < first:
                items.popleft()
        while self._resting_seq and self._resting_seq[0] < first:
            self._resting_seq.popleft()
            self._resting.popleft()
        while self._scales and self._scales[0][0] < first:
            self._scales.popleft()
        self._count(v, -1)

    def _count(self, v: Vitals, step: int) -> None:
        if v.events:
            _bump(self._events, set(v.events), step)
        if v.consciousness:
            _bump(self._levels, (v.consciousness,), step)
        if v.on_oxygen is not None:
            self._oxygen_known += step
            self._oxygen_on += step if v.on_oxygen else 0

    def summary(self) -> WindowSummary:
        lows: dict[str, float] = {}
        highs: dict[str, float] = {}
        for name in NEWS2_NUMERIC:
            high = self._max[name].value()
            if high is not None:
                highs[name] = high
                lows[name] = -self._neg_min[name].value()  # type: ignore[operator]
        return WindowSummary(
            readings=len(self._vitals),
            lows=lows,
            highs=highs,
            spo2_highest_low=self._max["spo2_low"].value(),
            resting_hr_high=self._max["resting_hr"].value(),
            resting_hr=tuple(self._resting),
            consciousness=tuple(sorted(self._levels)),
            on_oxygen=self._oxygen_on > 0 if self._oxygen_known > 0 else None,
            spo2_scale=self._scales[-1][1] if self._scales else 1,
            events=frozenset(self._events),
        )


def _bump(counter: Counter[str], keys: tuple[str, ...] | set[str], step: int) -> None:
    """Add `step` to each key's count, deleting keys that reach zero (so the counter's keys
    are exactly what the window holds)."""
    for key in keys:
        n = counter[key] + step
        if n > 0:
            counter[key] = n
        else:
            del counter[key]
