#!/usr/bin/env python3
"""Start-up and memory of the engine with and without the prepacked-graph cache (issue #13).

    python tools/bench_load.py MODEL_DIR [--threads 2] [--tokens 32] [--repeats 3] [--json F]

Each configuration runs in a fresh process, one after the other, on the same model:

  plain  repacking on the heap at every load (onnxruntime's default; `model.prepacked_cache:
         false`)
  cold   the first start with the cache: loads the original graph and writes the copy
  warm   every later start: the copy's prepacked weights are memory-mapped

and reports load seconds, peak RSS (VmHWM), RSS and its anonymous (heap) part after a short
generation, and decode tokens/s, with each configuration's ratio to `plain` measured in the
same run. Anonymous memory is what the kernel cannot reclaim; file-backed pages of the copy are
shared and clean, and count in RSS only while resident.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_worker import status_mb  # a sibling script: the tools directory is on sys.path

CONFIGS = ("plain", "cold", "warm")


_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


def _heap_in_use_mib() -> float | None:
    """The C heap's bytes in use (glibc's mallinfo2: small chunks and mmapped ones), in MiB.

    Unlike RSS, this counts only this process's own allocations: under qemu-user (the ARM
    measurement, tools/arm64_check.sh --bench-load) RSS also holds the emulator and its
    translated code, but the guest's malloc is the guest's glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS.split()]

    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)  # glibc 2.33+
    if mallinfo2 is None:
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return float(info.uordblks + info.hblkhd) / 2**20


def worker(model: str, cache: str | None, threads: int, tokens: int) -> dict[str, Any]:
    """One start and one generation in this process; what it cost."""
    from edged.engine import Engine, EngineOptions, GenerationConfig

    started = time.perf_counter()
    options = EngineOptions(
        threads=threads, context_length=512, prepacked_cache=Path(cache) if cache else None
    )
    heap_before = _heap_in_use_mib()
    engine = Engine.load(model, options)
    load_s = time.perf_counter() - started
    heap_after = _heap_in_use_mib()
    load_heap = None if heap_before is None or heap_after is None else heap_after - heap_before
    messages = [{"role": "user", "content": "My heart rate is 118 at rest. Should I worry?"}]
    layout = engine.layout
    kv_budget = layout.kv_bytes_per_token() * engine.context_length / 2**20
    kv_budget = kv_budget if layout.shared_kv_buffer else 0.0
    result = engine.chat(messages, GenerationConfig(max_new_tokens=tokens, ignore_eos=True))
    return {
        "load_s": round(load_s, 3),
        "peak_rss_mb": round(status_mb("VmHWM") or 0.0, 1),
        "rss_mb": round(status_mb("VmRSS") or 0.0, 1),
        "anon_mb": round(status_mb("RssAnon") or 0.0, 1),
        "load_heap_mb": round(load_heap, 1) if load_heap is not None else 0.0,
        # preallocated at load (so inside load_heap_mb) by the one-buffer-per-layer runner
        "kv_budget_mb": round(kv_budget, 1),
        "decode_tok_s": round(result.timing.decode_tps or 0.0, 2),
    }


def run(model: Path, config: str, cache: Path, threads: int, tokens: int) -> dict[str, Any]:
    args = [sys.executable, __file__, str(model), "--worker", config]
    args += ["--threads", str(threads), "--tokens", str(tokens)]
    if config != "plain":
        args += ["--cache", str(cache)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{config} run failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure(
    model: Path, threads: int, tokens: int, repeats: int, configs: tuple[str, ...] = CONFIGS
) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="edged-prepacked-") as tmp:
            cache = Path(tmp) / "prepacked"
            for config in configs:  # cold writes the copy that warm then reads
                samples[config].append(run(model, config, cache, threads, tokens))
                print(f"{config}: {samples[config][-1]}", file=sys.stderr)
    return {
        c: {k: statistics.median(s[k] for s in samples[c]) for k in samples[c][0]} for c in configs
    }


def render(model: Path, result: dict[str, dict[str, float]]) -> str:
    files = sum(p.stat().st_size for p in model.glob("model.onnx*")) / 2**20
    keys = ("load_s", "peak_rss_mb", "rss_mb", "anon_mb", "load_heap_mb", "decode_tok_s")
    heads = ("load s", "peak RSS MB", "RSS MB", "heap MB", "load heap MB", "tok/s")
    lines = [
        f"model {model} ({files:.0f} MB of graph files); medians; ratio to plain in brackets; "
        f"load heap: C heap the load allocated, {_heap_ratio(result, files)}",
        f"{'':6} " + " ".join(f"{h:>16}" for h in heads),
    ]
    base = result.get("plain")
    for config, row in result.items():
        cells = [
            f"{row[k]:8.2f} ({row[k] / base[k]:.2f})" if base and base[k] else f"{row[k]:8.2f}"
            for k in keys
        ]
        lines.append(f"{config:6} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def _heap_ratio(result: dict[str, dict[str, float]], files_mib: float) -> str:
    row = result.get("plain") or next(iter(result.values()))
    if not row.get("load_heap_mb") or not files_mib:
        return "not measured (no glibc mallinfo2)"
    kv = row.get("kv_budget_mb", 0.0)
    return f"{row['load_heap_mb'] / (files_mib + kv):.2f}x (graph files + KV budget {kv:.0f} MB)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"which starts to measure, comma-separated (default: {','.join(CONFIGS)})",
    )
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(str(args.model), args.cache, args.threads, args.tokens)))
        return 0
    configs = tuple(c for c in args.configs.split(",") if c)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        ap.error(f"--configs {args.configs!r}: expected some of {', '.join(CONFIGS)}")
    if "warm" in configs and "cold" not in configs:
        ap.error("--configs: warm reads the copy cold writes; ask for cold too")
    result = measure(args.model, args.threads, args.tokens, args.repeats, configs)
    print(render(args.model, result))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "medians": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
