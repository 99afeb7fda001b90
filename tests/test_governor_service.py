"""The governor as the daemon and the thermal simulator use it: a fake board tree in the
kernel's formats, read by the real sensors, decided by the real policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.config.models import GovernorConfig
from edged.domain import GovernorState
from edged.governor.policy import GovernorInput, GovernorPolicy, decide
from edged.governor.service import GovernorService, build_policy

pytestmark = pytest.mark.arm64  # file reads and pure policy: part of the ARM subset


def _board(root: Path, temp_c: float, cpu_max: str | None = None) -> Path:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{int(temp_c * 1000)}\n")
    if cpu_max is not None:
        (root / "proc/self").mkdir(parents=True, exist_ok=True)
        (root / "proc/self/cgroup").write_text("0::/edged.service\n")
        group = root / "sys/fs/cgroup/edged.service"
        group.mkdir(parents=True, exist_ok=True)
        (group / "cpu.max").write_text(cpu_max + "\n")
    return root


def _config(root: Path, **keys: object) -> GovernorConfig:
    return GovernorConfig.model_validate(
        {"sensor_root": root, "profile": "generic", "dwell_s": 5, **keys}
    )


def test_a_tick_reads_the_board_and_publishes_one_decision(tmp_path: Path) -> None:
    root = _board(tmp_path, 45.0)
    governor = GovernorService(_config(root), max_threads=4, now=0.0)
    assert governor.decision.state == GovernorState.NOMINAL and governor.decision.threads == 4
    _board(root, 85.0)  # generic: hot from 83 °C
    decision = governor.tick(2.0)
    assert decision is governor.decision
    assert decision.state == GovernorState.HOT and decision.threads == 2
    assert governor.readings is not None and governor.readings.temp_c == 85.0


def test_cooling_waits_for_the_dwell_on_the_callers_clock(tmp_path: Path) -> None:
    root = _board(tmp_path, 85.0)
    governor = GovernorService(_config(root), max_threads=4, now=100.0)
    _board(root, 40.0)
    assert governor.tick(103.0).state == GovernorState.HOT  # within dwell_s = 5
    assert governor.tick(106.0).state == GovernorState.NOMINAL


def test_the_cpu_quota_caps_threads_in_every_state(tmp_path: Path) -> None:
    root = _board(tmp_path, 45.0, cpu_max="150000 100000")  # 1.5 CPUs: 2 threads
    governor = GovernorService(_config(root), max_threads=4, now=0.0)
    assert governor.decision.threads == 2
    assert "CPU quota 2 cores" in governor.decision.reason
    _board(root, 85.0, cpu_max="max 100000")
    assert governor.tick(1.0).threads == 2  # hot: half of 4, the quota gone


def test_decide_honours_the_cpus_reading_and_ignores_an_unknown_one() -> None:
    policy = GovernorPolicy.for_profile("generic", max_threads=4)
    nominal = GovernorInput(temp_c=40.0)
    assert decide(None, nominal, policy, 0.0)[0].threads == 4
    capped = GovernorInput(temp_c=40.0, cpus=1)
    assert decide(None, capped, policy, 0.0)[0].threads == 1
    critical = GovernorInput(temp_c=99.0, cpus=3)
    assert decide(None, critical, policy, 0.0)[0].threads == 1


def test_a_disabled_governor_reads_nothing_and_allows_every_thread(tmp_path: Path) -> None:
    root = _board(tmp_path, 99.0, cpu_max="100000 100000")
    governor = GovernorService(_config(root, enabled=False), max_threads=3, now=0.0)
    assert governor.readings is None
    assert governor.tick(1.0).state == GovernorState.NOMINAL
    assert governor.decision.threads == 3 and governor.decision.model_available


def test_reconfigure_applies_new_bands_and_keeps_the_state(tmp_path: Path) -> None:
    root = _board(tmp_path, 60.0)
    governor = GovernorService(_config(root), max_threads=2, now=0.0)
    assert governor.decision.state == GovernorState.NOMINAL
    governor.reconfigure(_config(root, warm_c=50, hot_c=55, critical_c=70))
    assert governor.policy.bands.hot_c == 55
    assert governor.tick(1.0).state == GovernorState.HOT


def test_build_policy_takes_the_configured_thresholds(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        hysteresis_c=4,
        min_headroom_mb=100,
        shrink_context_below_mb=300,
        shrunk_context=256,
    )
    policy = build_policy(cfg, max_threads=4)
    assert (policy.bands.hysteresis_c, policy.bands.dwell_s) == (4, 5)
    assert (policy.min_headroom_mb, policy.shrink_context_below_mb, policy.shrunk_context) == (
        100,
        300,
        256,
    )
    assert policy.bands.critical_c == 90.0  # the generic profile's
