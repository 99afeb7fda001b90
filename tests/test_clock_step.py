"""The ticker tells the operator when the wall clock was set (NTP stepping a Pi that booted
without a real-time clock, or `date -s`): alert and status `ts` follow it, while deadlines, the
vitals window and the alert cooldown do not. tools/soak.py's wall_clock_jump checks the log
line on a real daemon; here, the rule."""

from __future__ import annotations

import pytest

from edged.service.ticker import CLOCK_STEP_S, clock_step


@pytest.mark.parametrize("step", [7200.0, -7200.0, CLOCK_STEP_S + 1, -(CLOCK_STEP_S + 1)])
def test_a_step_of_the_wall_clock_is_reported_with_its_sign(step: float) -> None:
    offset = 1.76e9  # time.time() - time.monotonic() on a board up for a while
    assert clock_step(offset, offset + step) == pytest.approx(step)


@pytest.mark.parametrize("drift", [0.0, 0.002, -0.5, CLOCK_STEP_S])
def test_drift_and_slewing_are_not_a_step(drift: float) -> None:
    assert clock_step(1.76e9, 1.76e9 + drift) is None
