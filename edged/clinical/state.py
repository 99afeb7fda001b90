"""Recent vitals per wearer: a rolling window, bounded whatever the traffic.

Three bounds keep memory flat: at most `max_wearers` wearers (the least recently seen is
evicted), at most `max_per_wearer` summaries each, and nothing older than the window. A wearer
not heard from for `ttl_s` is forgotten at the next sweep. The window is timed by the daemon's
clock at receipt, not by the gateway's `ts`, so a gateway with a wrong clock cannot keep stale
readings alive or push fresh ones out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from edged.mqtt.messages import Vitals


@dataclass(frozen=True, slots=True)
class Reading:
    received_at: float
    vitals: Vitals


class VitalsState:
    def __init__(
        self, window_s: float, max_wearers: int, max_per_wearer: int, ttl_s: float
    ) -> None:
        self.window_s = window_s
        self.max_wearers = max_wearers
        self.max_per_wearer = max_per_wearer
        self.ttl_s = ttl_s
        # Written by the MQTT thread, read by the worker: one lock, held for microseconds.
        self._lock = threading.Lock()
        self._wearers: OrderedDict[str, deque[Reading]] = OrderedDict()
        self._last_sweep = 0.0

    def add(self, wearer: str, vitals: Vitals, now: float) -> tuple[Vitals, ...]:
        """Record a summary; return the wearer's window after it, oldest first."""
        with self._lock:
            readings = self._wearers.get(wearer)
            if readings is None:
                readings = deque(maxlen=self.max_per_wearer)
                self._wearers[wearer] = readings
                while len(self._wearers) > self.max_wearers:
                    self._wearers.popitem(last=False)
            else:
                self._wearers.move_to_end(wearer)
            readings.append(Reading(now, vitals))
            self._prune(readings, now)
            if now - self._last_sweep > min(self.ttl_s, self.window_s) / 4:
                self._sweep(now)
            return tuple(r.vitals for r in readings)

    def window(self, wearer: str, now: float) -> tuple[Vitals, ...]:
        """The wearer's summaries within the window, oldest first (empty if none)."""
        with self._lock:
            readings = self._wearers.get(wearer)
            if readings is None:
                return ()
            self._prune(readings, now)
            return tuple(r.vitals for r in readings)

    def __len__(self) -> int:
        return len(self._wearers)

    def summaries(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._wearers.values())

    def _prune(self, readings: deque[Reading], now: float) -> None:
        horizon = now - self.window_s
        while readings and readings[0].received_at < horizon:
            readings.popleft()

    def _sweep(self, now: float) -> None:
        # Least recently seen first: stop at the first wearer still within the TTL.
        self._last_sweep = now
        while self._wearers:
            wearer, readings = next(iter(self._wearers.items()))
            if readings and now - readings[-1].received_at < self.ttl_s:
                break
            del self._wearers[wearer]
