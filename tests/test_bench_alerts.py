"""tools/bench_alerts.py: its report says how much of a phase's latency was the machine's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _models import load_tool

bench_alerts = load_tool("bench_alerts")


def test_a_stall_is_the_longest_run_of_consecutive_late_alerts() -> None:
    latencies = [2.0] * 10 + [400.0, 350.0, 300.0] + [2.0] * 5 + [60.0] + [2.0] * 10
    assert bench_alerts.worst_stall(latencies) == {"alerts": 3, "first": 10, "max_ms": 400.0}
    assert bench_alerts.worst_stall([2.0, 3.0, 2.5])["alerts"] == 0


def test_a_stall_from_the_first_alert_on_is_found() -> None:
    """A machine busy as the phase starts delays the first alerts (seen: 493, 460, 427 ms...)."""
    latencies = [493.0, 460.0, 427.0] + [2.0] * 27
    assert bench_alerts.worst_stall(latencies) == {"alerts": 3, "first": 0, "max_ms": 493.0}


def test_report_has_both_phases_with_foreign_cpu_and_stalls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real mosquitto and the daemon on the bundled model, started by the tool itself.
    out = tmp_path / "alerts.json"
    argv = ["--count", "30", "--rate", "30", "--max-tokens", "32", "--warmup", "5"]
    code = bench_alerts.main([*argv, "--json", str(out)])

    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert code in (0, 1), captured.err  # 1: a missed target on a busy machine
    for phase in ("idle", "during_generation"):
        assert report[phase]["received"] == report[phase]["sent"] == 30
        assert 0 <= report[phase]["others_cpu_pct"] <= 100
        assert report[phase]["worst_stall"]["alerts"] >= 0
    assert "others' CPU" in captured.out and "worst stall" in captured.out
    assert "bench_alerts: idle phase" in captured.err
