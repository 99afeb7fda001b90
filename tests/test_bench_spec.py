"""tools/bench_spec.py: the speculative workload's comparison with llama.cpp and
onnxruntime-genai runs in rounds, and its figures are only as good as the way rounds combine:
each ratio is the median of the rounds' ratios (an engine against another measured minutes
apart compares the minutes), counts stay as measured, failed rounds are left out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _models import load_tool

bench_spec = load_tool("bench_spec")


def _round(edged_spec: float, genai_best: float, genai_plain: float) -> dict[str, Any]:
    edged = {"tokens": 300, "plain_tps": 2000.0, "spec_tps": edged_spec, "speedup": 1.5}
    demo = {"edged": edged, "traces": [[(2, 1)]], "dialogues": 3}
    settings = {
        "plain": {"tokens": 300, "decode_tps": genai_plain},
        "n3 k4": {"tokens": 300, "decode_tps": genai_best},
        "n4 k8": {"tokens": 300, "decode_tps": genai_best - 1.0},
    }
    parts: dict[str, Any] = {"demo": demo, "genai_ngram": {"settings": settings}}
    parts["ratios"] = bench_spec._round_ratios(parts)
    return parts


def test_each_comparison_is_the_median_of_the_rounds_ratios() -> None:
    # The machine halves its speed in the second round: both engines slow down alike.
    rounds = [_round(3000.0, 2000.0, 2500.0), _round(1500.0, 1000.0, 1250.0)]
    rounds.append(_round(2000.0, 2500.0, 2000.0))
    assert [r["ratios"]["spec_vs_genai_ngram"] for r in rounds] == [1.5, 1.5, 0.8]
    assert rounds[0]["ratios"]["plain_vs_genai"] == 0.8
    assert rounds[0]["ratios"]["spec_vs_llamacpp_lookup"] is None  # not run
    workload = {"demo": bench_spec.median_rounds([r["demo"] for r in rounds])}
    workload["rounds"] = [r["ratios"] for r in rounds]
    # A ratio of the medians would pair one round's edged (2000) with another's genai (2000).
    assert workload["demo"]["edged"]["spec_tps"] == 2000.0
    assert bench_spec.ratios(workload)["spec_vs_genai_ngram"] == 1.5
    workload["rounds"] = [r["ratios"] for r in rounds[1:]]
    assert bench_spec.ratios(workload)["spec_vs_genai_ngram"] == 1.15


def test_speeds_are_medians_counts_and_traces_as_measured_failed_rounds_left_out() -> None:
    parts = [
        {"tps": 10.0, "tokens": 300, "trace": [[1, 1]], "name": "a", "nested": {"tps": 1.0}},
        {"error": "worker exited with status 1"},
        {"tps": 30.0, "tokens": 300, "trace": [[1, 1]], "name": "a", "nested": {"tps": 3.0}},
        {"tps": 20.0, "tokens": 300, "trace": [[1, 1]], "name": "a", "nested": {"tps": 9.0}},
    ]
    merged = bench_spec.median_rounds(parts)
    assert merged == {
        "tps": 20.0,
        "tokens": 300,
        "trace": [[1, 1]],
        "name": "a",
        "nested": {"tps": 3.0},
    }
    failed = [{"error": "first"}, {"error": "second"}]
    assert bench_spec.median_rounds(failed) == {"error": "first"}


def test_the_workload_runs_the_demo_model_once_per_round_and_keeps_the_first_traces() -> None:
    """The real edged side on the demo model, two dialogues, two rounds; no other engine."""
    calls: list[str] = []

    def run(task: str, spec: dict[str, Any]) -> dict[str, Any]:
        calls.append(task)
        assert task == "spec-demo"
        result: dict[str, Any] = bench_spec.run_demo(spec)
        return result

    plan = bench_spec.SpecPlan(
        dialogues=2,
        threads=1,
        context=1024,
        cache_root=Path("/nonexistent"),
        replay_dir=None,
        replay_label="",
        prompt=[],
        llama=False,
        genai=False,
        rounds=2,
    )
    out = bench_spec.run_workload(plan, run, lambda _msg: None)
    assert calls == ["spec-demo", "spec-demo"]
    assert len(out["traces"]) == 2 and all(t["trace"] for t in out["traces"])
    assert "traces" not in out["demo"] and "prompts" not in out["demo"]
    # Asked again after a full window of other questions' answers: the same questions.
    window_full = out["demo"]["edged_window_full"]
    assert window_full["tokens"] > 0 and window_full["passes"] > 0
    assert len(out["rounds"]) == 2
    speedups = sorted(r.pop("spec_speedup") for r in out["rounds"])
    assert all(value is None for r in out["rounds"] for value in r.values())  # none ran
    ratios = bench_spec.ratios(out)
    assert ratios["spec_speedup"] == round((speedups[0] + speedups[1]) / 2, 3)
    assert ratios["spec_speedup_window_full"] == round(window_full["speedup"], 3)
    assert "edged, demo model, window full" in bench_spec.table(out)
    assert ratios["spec_vs_genai_ngram"] is None and ratios["spec_replay_speedup"] is None
