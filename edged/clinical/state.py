"""Recent vitals per wearer: a rolling window, bounded whatever the traffic.

Three bounds keep memory flat: at most `max_wearers` wearers (the least recently seen is
evicted), at most `max_per_wearer` summaries each, and nothing older than the window. A wearer
not heard from for `ttl_s` is forgotten at the next sweep. The window is timed by the daemon's
monotonic clock at receipt, not by the gateway's `ts` nor by the wall clock, so neither a
gateway with a wrong clock nor the board's clock being set (NTP after a Pi boots without a
real-time clock) can keep stale readings alive or push fresh ones out. `now`: that clock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

from edged.clinical.window import WindowAggregate, WindowSummary
from edged.domain import Vitals


class _Wearer:
    __slots__ = ("received", "aggregate")

    def __init__(self) -> None:
        self.received: deque[float] = deque()
        self.aggregate = WindowAggregate()


class VitalsState:
    def __init__(
        self, window_s: float, max_wearers: int, max_per_wearer: int, ttl_s: float
    ) -> None:
        # Written by the MQTT thread, read by the worker: one lock, held for microseconds.
        self._lock = threading.Lock()
        self._wearers: OrderedDict[str, _Wearer] = OrderedDict()
        self._last_sweep = 0.0
        self.configure(window_s, max_wearers, max_per_wearer, ttl_s)

    def configure(
        self, window_s: float, max_wearers: int, max_per_wearer: int, ttl_s: float
    ) -> None:
        """New bounds (a reload); they apply from the next summary on."""
        with self._lock:
            self.window_s = window_s
            self.max_wearers = max_wearers
            self.max_per_wearer = max_per_wearer
            self.ttl_s = ttl_s

    def add(self, wearer: str, vitals: Vitals, now: float) -> WindowSummary:
        """Record a summary; return what triage needs to know of the window after it."""
        with self._lock:
            entry = self._wearers.get(wearer)
            if entry is None:
                entry = _Wearer()
                self._wearers[wearer] = entry
                while len(self._wearers) > self.max_wearers:
                    self._wearers.popitem(last=False)
            else:
                self._wearers.move_to_end(wearer)
            entry.received.append(now)
            entry.aggregate.push(vitals)
            if len(entry.received) > self.max_per_wearer:
                self._drop_oldest(entry)
            self._prune(entry, now)
            if now - self._last_sweep > min(self.ttl_s, self.window_s) / 4:
                self._sweep(now)
            return entry.aggregate.summary()

    def window(self, wearer: str, now: float) -> tuple[Vitals, ...]:
        """The wearer's summaries within the window, oldest first (empty if none)."""
        with self._lock:
            entry = self._wearers.get(wearer)
            if entry is None:
                return ()
            self._prune(entry, now)
            return entry.aggregate.vitals()

    def __len__(self) -> int:
        return len(self._wearers)

    def summaries(self) -> int:
        with self._lock:
            return sum(len(e.received) for e in self._wearers.values())

    @staticmethod
    def _drop_oldest(entry: _Wearer) -> None:
        entry.received.popleft()
        entry.aggregate.pop_oldest()

    def _prune(self, entry: _Wearer, now: float) -> None:
        horizon = now - self.window_s
        while entry.received and entry.received[0] < horizon:
            self._drop_oldest(entry)

    def _sweep(self, now: float) -> None:
        # Least recently seen first: stop at the first wearer still within the TTL.
        self._last_sweep = now
        while self._wearers:
            wearer, entry = next(iter(self._wearers.items()))
            if entry.received and now - entry.received[-1] < self.ttl_s:
                break
            del self._wearers[wearer]
