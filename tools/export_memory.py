#!/usr/bin/env python3
"""Peak memory and time of `edged model export` for the public Qwen3 shapes (issue #12, part 5).

    python tools/export_memory.py                          # 0.6B, both export paths
    python tools/export_memory.py --shapes qwen3-0.6b qwen3-1.7b --paths optimum
    python tools/export_memory.py --json export-memory.json

For each shape a checkpoint with random weights (bf16 safetensors, as the public Qwen3 and
MedPsy checkpoints are published; the test tokenizer) is built once under
~/.cache/edged/export-memory/, then each export path runs as its own
`edged model export` process, int4, with verification as `edged model export` does it by
default. Peak memory is what the machine must have free: the larger of the summed resident set
sizes of that process and its children, sampled every 100 ms (the ort-genai path runs the
builder in a venv of its own), and the exporter's own high-water mark. A run that fails (e.g.
killed for memory) is reported as such.

Random weights cost the same memory and time as trained ones: every tensor is materialised,
converted and quantized the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from make_test_model import QWEN3_SHAPES  # a sibling script: its directory is on sys.path

CACHE_ROOT = Path.home() / ".cache" / "edged" / "export-memory"
SHAPES: dict[str, dict[str, int]] = {
    # The public Qwen3 configs, context trimmed: it changes no weight.
    name: {**config, "max_position_embeddings": 4096}
    for name, config in QWEN3_SHAPES.items()
}
PATHS = ("stream", "optimum", "ort-genai")
TARGET_GB = {"qwen3-1.7b": 8.0, "qwen3-4b": 16.0}


def checkpoint(shape: str) -> Path:
    out = CACHE_ROOT / shape / "checkpoint-bf16"
    if not (out / "config.json").is_file():
        import make_test_model  # a sibling script: its directory is on sys.path

        partial = out.with_name("checkpoint.partial")
        shutil.rmtree(partial, ignore_errors=True)
        print(f"building the {shape} checkpoint (random weights) in {out}", file=sys.stderr)
        make_test_model.build_checkpoint(
            partial, SHAPES[shape], sampling_defaults=False, dtype="bfloat16"
        )
        partial.rename(out)
    return out


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited between the two calls
            total += proc.memory_info().rss
    return total


def measure(command: list[str]) -> dict[str, Any]:
    """Run `command`; its peak memory, wall time and outcome. The peak is the larger of the
    process tree's summed RSS (sampled: catches a builder subprocess beside the exporter) and
    the exporter's own high-water mark from wait4 (exact: catches peaks between samples)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    sampled = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        sampled = max(sampled, _tree_rss(proc.pid))
        time.sleep(0.1)
    proc.returncode = returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read() if proc.stderr else ""
    high_water = usage.ru_maxrss * 1024  # KiB on Linux
    result: dict[str, Any] = {
        "peak_rss_gb": round(max(sampled, high_water) / 2**30, 2),
        "sampled_tree_gb": round(sampled / 2**30, 2),
        "high_water_gb": round(high_water / 2**30, 2),
        "seconds": round(time.perf_counter() - started, 1),
        "ok": returncode == 0,
    }
    if returncode != 0:
        result["failure"] = f"exit {returncode}: {stderr.strip()[-400:]}"
    return result


def run(shape: str, path: str, keep: bool) -> dict[str, Any]:
    source = checkpoint(shape)
    out = CACHE_ROOT / shape / f"{path}-int4"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "edged", "model", "export", str(source), str(out)]
    command += ["--exporter", path, "--no-progress", "--overwrite"]
    result = {"shape": shape, "path": path, **measure(command)}
    if result["ok"]:
        result["model_gb"] = round(sum(p.stat().st_size for p in out.iterdir()) / 2**30, 2)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'shape':12} {'path':10} {'peak RSS GB':>11} {'target':>7} {'minutes':>8} result"]
    for r in rows:
        target = TARGET_GB.get(r["shape"])
        outcome = "ok" if r["ok"] else r["failure"].splitlines()[0][:60]
        lines.append(
            f"{r['shape']:12} {r['path']:10} {r['peak_rss_gb']:11.2f} "
            f"{(f'{target:.0f}' if target else '-'):>7} {r['seconds'] / 60:8.1f} {outcome}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=["qwen3-0.6b"])
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--keep", action="store_true", help="keep the exported directories")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for shape in args.shapes:
        for path in args.paths:
            rows.append(run(shape, path, args.keep))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
