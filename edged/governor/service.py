"""The governor as one object: config and board in, `tick(now) -> GovernorDecision` out.

It reads the sensors, runs the pure policy, remembers its thermal state between readings and
publishes each decision as one immutable value (`decision`). It acts on nothing itself: the
daemon applies a decision (threads, duty cycle, caps) and `tools/thermal_sim.py` drives the
very same object on a fake sysfs tree with a simulated clock.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from edged.config.layers import detect_board
from edged.config.models import GovernorConfig
from edged.governor.policy import (
    GovernorDecision,
    GovernorInput,
    GovernorPolicy,
    ThermalBands,
    ThermalState,
    decide,
)
from edged.governor.sensors import Readings, read_all

log = logging.getLogger(__name__)


def build_policy(cfg: GovernorConfig, max_threads: int) -> GovernorPolicy:
    """The policy for this board and config: the profile's bands (or the configured ones,
    all three, validated as rising by the config), hysteresis, dwell and memory thresholds."""
    profile = detect_board(cfg.sensor_root) if cfg.profile == "auto" else cfg.profile
    base = GovernorPolicy.for_profile(profile, max_threads=max_threads)
    bands = base.bands
    if cfg.warm_c is not None and cfg.hot_c is not None and cfg.critical_c is not None:
        bands = replace(bands, warm_c=cfg.warm_c, hot_c=cfg.hot_c, critical_c=cfg.critical_c)
    return replace(
        base,
        bands=ThermalBands(
            bands.warm_c, bands.hot_c, bands.critical_c, cfg.hysteresis_c, cfg.dwell_s
        ),
        min_headroom_mb=cfg.min_headroom_mb,
        shrink_context_below_mb=cfg.shrink_context_below_mb,
        shrunk_context=cfg.shrunk_context,
    )


def governor_input(readings: Readings) -> GovernorInput:
    """What the policy needs of one sensor snapshot."""
    throttle = readings.throttle
    return GovernorInput(
        temp_c=readings.temp_c,
        firmware_throttling=bool(
            throttle and (throttle.throttled or throttle.freq_capped or throttle.soft_temp_limit)
        ),
        mem_headroom_mb=readings.mem_headroom_mb,
        cpus=readings.cpus,
    )


class GovernorService:
    """Owned by one thread (the daemon's ticker); others read `decision` and `readings`, which
    are replaced whole, never mutated."""

    def __init__(self, cfg: GovernorConfig, max_threads: int, now: float) -> None:
        self._max_threads = max_threads
        # Board detection reads files: build the policy once, and again on reconfigure().
        # Config and policy change together, as one reference (tick reads it once).
        self._setup = (cfg, build_policy(cfg, max_threads))
        self._state: ThermalState | None = None
        self.readings: Readings | None = None
        self.decision: GovernorDecision = self._decide(now)

    @property
    def policy(self) -> GovernorPolicy:
        return self._setup[1]

    def reconfigure(self, cfg: GovernorConfig) -> None:
        """A reload: governor keys are live; the thermal state carries over."""
        self._setup = (cfg, build_policy(cfg, self._max_threads))

    def tick(self, now: float) -> GovernorDecision:
        """Read the sensors and decide; `now` is monotonic seconds (simulated in thermal_sim)."""
        previous = self.decision
        decision = self._decide(now)
        if (previous.state, previous.accept_queries) != (decision.state, decision.accept_queries):
            log.warning(
                "governor: %s -> %s (%s)%s",
                previous.state,
                decision.state,
                decision.reason,
                "" if decision.accept_queries else "; refusing new queries: memory headroom low",
            )
        return decision

    def _decide(self, now: float) -> GovernorDecision:
        cfg, policy = self._setup
        # Disabled: no sensor is read and the decision stays nominal, every thread allowed.
        readings = read_all(cfg.sensor_root) if cfg.enabled else None
        reading = governor_input(readings) if readings is not None else GovernorInput(temp_c=None)
        decision, self._state = decide(self._state, reading, policy, now)
        self.readings, self.decision = readings, decision
        return decision
