"""tools/bench_mqtt.py keeps stdout for its results and reports progress on stderr."""

from __future__ import annotations

import json

import pytest
from _models import load_tool

bench_mqtt = load_tool("bench_mqtt")


def test_progress_goes_to_stderr_and_stdout_starts_with_the_results_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A real mosquitto and the real daemon on the bundled model (the tool starts both).
    argv = ["--samples", "2", "--warmup", "1", "--max-tokens", "4", "--skip-vitals"]
    code = bench_mqtt.main([*argv, "--progress-every", "0.001"])

    captured = capsys.readouterr()
    assert code in (0, 1), captured.err  # 1: a missed target on a busy machine, not a crash
    result, _ = json.JSONDecoder().raw_decode(captured.out)
    assert result["latency"]["samples"] == 2
    progress = [line for line in captured.err.splitlines() if line.startswith("bench_mqtt: ")]
    assert any("latency: query 3/3" in line for line in progress), captured.err
    assert "bench_mqtt:" not in captured.out
