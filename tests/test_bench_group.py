"""tools/bench_group.py, smoke only: a few seconds of load on 1, 2 and 3 real daemons in one
share group on a real mosquitto. The throughput itself is a benchmark, not a timed test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _models import load_tool

bench_group = load_tool("bench_group")


def test_every_query_is_answered_exactly_once_and_the_work_is_spread_over_the_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "group.json"
    # About 12 queries a phase: fewer than one node's queue holds, so none is refused busy.
    argv = ["--quick", "--duration", "2", "--max-tokens", "12", "--load", "1.0"]
    argv += ["--wearers", "6", "--vitals-rate", "2", "--progress-every", "1", "--json", str(out)]

    code = bench_group.main(argv)

    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert [p["nodes"] for p in report["phases"]] == [1, 2, 3]
    for phase in report["phases"]:
        assert phase["sent"] > 0
        assert phase["answered"] == phase["sent"], phase
        assert phase["lost"] == phase["duplicated"] == phase["busy"] == 0, phase
        assert phase["errors"] == {}, phase
        assert sum(phase["answers_by_node"].values()) == phase["sent"]
        assert len(phase["answers_by_node"]) == phase["nodes"], phase["answers_by_node"]
    assert report["exactly_once"] is True
    # The verdict is printed either way; a missed target (likely in 2 s) is exit status 1.
    assert code == (0 if report["target_met"] else 1)
    assert "every query answered exactly once" in captured.out
    assert "target >= 2.7x at 3 nodes: " in captured.out
    assert "bench_group: 3 node(s): " in captured.err
    assert "bench_group:" not in captured.out
