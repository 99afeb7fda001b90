"""Benchmark tasks in processes of their own (tools/bench_engine.py, bench_llama.py,
bench_spec.py): what a worker measures about itself (VmHWM, VmRSS, medians of repeated runs)
and hands back (one line of JSON), and how the driver runs one (`run_task`: the right
interpreter, an idle machine, the CPU other processes took meanwhile).

Workers run under three interpreters (the project's, the onnxruntime-genai virtualenv's and
the llama.cpp one's), so this module imports nothing but the standard library at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULT_MARK = "BENCH-RESULT "
WORKER_SCRIPT = Path(__file__).resolve().with_name("bench_engine.py")
"""Every task runs as `bench_engine.py --worker`, its spec on stdin."""
BUSY_LIMIT_PCT = 10.0
"""A row during which other processes used more CPU than this (in % of all cores) is re-run."""
GENAI_TASKS = ("ort-genai", "genai-ngram")
LLAMA_TASKS = ("llama.cpp", "llama-lookup")


def status_mb(field: str) -> float | None:
    """A memory field of this process's /proc/self/status (VmHWM, VmRSS, RssAnon) in MiB; None
    where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM).

    Not getrusage's ru_maxrss: Linux carries the parent's high-water mark across fork+exec,
    so a worker spawned by a parent that built a model would report the parent's peak.
    """
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    current = status_mb("VmRSS")
    return float("nan") if current is None else current


def medians(runs: Sequence[Mapping[str, float | None]]) -> dict[str, Any]:
    """The median of each field over repeated runs, and every run's value (`spread`)."""
    keys = [k for k in runs[0] if all(r[k] is not None for r in runs)]
    out: dict[str, Any] = {k: None for k in runs[0]}  # None: not measured
    measured = {k: [v for r in runs if (v := r[k]) is not None] for k in keys}
    out.update({k: statistics.median(values) for k, values in measured.items()})
    out["spread"] = {k: [round(v, 2) for v in values] for k, values in measured.items()}
    return out


def emit(result: dict[str, Any]) -> None:
    """Hand the result to the driver (stdout, one marked line), with this process's peak RSS."""
    result["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def read_result(stdout: str) -> dict[str, Any] | None:
    found = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            found = json.loads(line[len(RESULT_MARK) :])
    return found


# -- the driver's side ----------------------------------------------------------------------


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of our finished children)."""
    import resource

    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    jiffies = [int(x) for x in fields]
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    busy = sum(jiffies) - jiffies[3] - jiffies[4]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def wait_for_idle(max_wait_s: float, threshold_pct: float = 10.0) -> float:
    """Wait (at most `max_wait_s`) until the machine is idle; return the last busy share in %.

    The box is shared with builds and test runs, and a busy core ruins a spinning thread pool's
    numbers, so every measurement starts on an idle machine where it can.
    """
    deadline = time.monotonic() + max_wait_s
    cores = os.cpu_count() or 1
    while True:
        busy0, _ = _cpu_seconds()
        time.sleep(1.0)
        busy1, _ = _cpu_seconds()
        pct = 100 * (busy1 - busy0) / cores
        if pct < threshold_pct or time.monotonic() > deadline:
            return pct
        time.sleep(2.0)


def _interpreter(task: str, env: dict[str, str]) -> str:
    """The python a task runs under: the genai or llama.cpp virtualenv's, or this one."""
    if task in GENAI_TASKS:
        from edged.export.genai_builder import ensure_genai_venv, genai_python

        env.pop("PYTHONPATH", None)
        return str(genai_python(ensure_genai_venv()))
    if task in LLAMA_TASKS:
        import quality_table  # builds the llama.cpp virtualenv on first use (~10 minutes)

        env.pop("PYTHONPATH", None)
        return str(quality_table.llama_python())
    return sys.executable


def run_task(task: str, spec: dict[str, Any], idle_wait: float) -> dict[str, Any]:
    """Run one worker task in a fresh process, on an idle machine where it can: its result,
    or `error`, with the CPU share other processes took meanwhile (`others_cpu_pct`)."""
    threads = str(spec.get("threads", 1))
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # onnxruntime's and onnxruntime-genai's usage telemetry (the genai worker never
        # imports edged, which sets this for its own processes).
        ORT_DISABLE_TELEMETRY="1",
    )
    python = _interpreter(task, env)
    cmd = [python, str(WORKER_SCRIPT), "--worker"]
    idle_pct = wait_for_idle(idle_wait, BUSY_LIMIT_PCT)
    started = time.perf_counter()
    busy0, ours0 = _cpu_seconds()
    payload = json.dumps({**spec, "task": task})
    proc = subprocess.run(cmd, input=payload, capture_output=True, text=True, env=env, check=False)
    busy1, ours1 = _cpu_seconds()
    wall = time.perf_counter() - started
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
    meta = {
        # CPU the rest of the machine used while the worker ran, in % of all cores: a row
        # measured beside another busy process is not comparable, and this says which were.
        "others_cpu_pct": round(100 * others / (wall * (os.cpu_count() or 1)), 1),
        "busy_before_pct": round(idle_pct, 1),
        "wall_s": round(wall, 1),
    }
    result = read_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        return {**meta, "error": _failure(proc.returncode, proc.stderr)}
    return {**result, **meta}


def _failure(returncode: int, stderr: str) -> str:
    """A failed worker's exit, the signal that killed it by name, and its last lines."""
    import signal

    how = f"worker exit {returncode}"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            how = f"worker killed by {signal.Signals(-returncode).name}"
    tail = "\n".join(stderr.strip().splitlines()[-12:])
    return f"{how}: {tail}" if tail else how
