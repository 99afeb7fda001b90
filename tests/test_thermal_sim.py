"""tools/thermal_sim.py: a table for people by default, JSON for scripts, progress on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _models import TINY_QWEN3_INT4, load_tool

thermal_sim = load_tool("thermal_sim")
SHORT = ["--model", str(TINY_QWEN3_INT4), "--seconds", "1", "--progress-every", "0.25"]


def test_default_output_is_a_table_and_json_path_still_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "thermal.json"

    assert thermal_sim.main([*SHORT, "--json", str(out)]) == 0

    captured = capsys.readouterr()
    assert not captured.out.lstrip().startswith("{"), "stdout is for people unless --json"
    rows = [line for line in captured.out.splitlines() if line.startswith(("fixed", "governed"))]
    assert len(rows) == 2 and "s above 80 °C" in captured.out
    assert "the governed run kept" in captured.out
    report = json.loads(out.read_text())
    assert {"fixed", "governed", "tokens_kept"} <= report.keys()
    assert report["fixed"]["tokens"] > 0
    progress = [line for line in captured.err.splitlines() if line.startswith("thermal_sim: ")]
    assert any(line.startswith("thermal_sim: fixed ") for line in progress), captured.err
    assert any(line.startswith("thermal_sim: governed ") for line in progress), captured.err


def test_json_flag_alone_prints_only_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert thermal_sim.main([*SHORT, "--json"]) == 0

    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing but the JSON document
    assert report["profile"] == "pi5" and report["limit_c"] == 80.0
    assert "thermal_sim:" in captured.err
