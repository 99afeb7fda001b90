"""The periodic work, on one thread (`edged-ticker`): the governor reads its sensors every
governor.interval_s and its decision is applied (cores for inference; the worker reads the
duty cycle and caps itself), and the retained status is refreshed every status.interval_s and
at every change of governor state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edged.config.models import EdgedConfig
from edged.engine import InferenceBackend
from edged.governor.policy import GovernorDecision
from edged.governor.service import GovernorService

log = logging.getLogger(__name__)


def apply_decision(decision: GovernorDecision, backend: InferenceBackend | None) -> None:
    if backend is not None and backend.parallelism != decision.threads:
        # Instant and memory-neutral: the same session, its threads narrowed to fewer cores.
        backend.set_parallelism(decision.threads)


CLOCK_STEP_S = 60.0
"""A change of the wall clock against the monotonic one larger than this is logged."""


def clock_step(offset_before: float, offset_now: float) -> float | None:
    """How far the wall clock was set between two readings of time.time() - time.monotonic(),
    or None for drift (NTP slewing moves it by milliseconds)."""
    step = offset_now - offset_before
    return step if abs(step) > CLOCK_STEP_S else None


class Ticker:
    def __init__(
        self,
        governor: GovernorService,
        backend: InferenceBackend | None,
        config: Callable[[], EdgedConfig],
        publish_status: Callable[[], None],
    ) -> None:
        self._governor = governor
        self._backend = backend
        self._config = config
        self._publish_status = publish_status
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edged-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_governor = next_status = time.monotonic()
        clock_offset = time.time() - next_status
        while not self._stopping.is_set():
            cfg = self._config()
            now = time.monotonic()
            offset, clock_offset = clock_offset, time.time() - now
            step = clock_step(offset, clock_offset)
            if step is not None:
                # Worth a line: alert and status `ts` follow the new time, while deadlines, the
                # vitals window and the alert cooldown run on the monotonic clock, unmoved.
                log.warning("the wall clock was set %+.0f s (NTP or by hand)", step)
            if cfg.governor.enabled and now >= next_governor:
                next_governor = now + cfg.governor.interval_s
                if self._tick_governor(now):
                    next_status = now  # API.md: the status is refreshed on every change
            if now >= next_status:
                next_status = now + cfg.status.interval_s
                self._publish_status()
            wait = min(next_status, next_governor if cfg.governor.enabled else next_status)
            self._stopping.wait(max(0.0, wait - time.monotonic()))

    def _tick_governor(self, now: float) -> bool:
        """Read, decide, apply; True when the state or admission changed."""
        before = self._governor.decision
        try:
            decision = self._governor.tick(now)
        except Exception:
            log.exception("governor tick failed")
            return False
        apply_decision(decision, self._backend)
        return (before.state, before.accept_queries) != (decision.state, decision.accept_queries)
