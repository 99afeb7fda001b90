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

CONFIGS = ("plain", "cold", "warm")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(model: str, cache: str | None, threads: int, tokens: int) -> dict[str, Any]:
    """One start and one generation in this process; what it cost."""
    from edged.engine import Engine, EngineOptions, GenerationConfig

    started = time.perf_counter()
    options = EngineOptions(
        threads=threads, context_length=512, prepacked_cache=Path(cache) if cache else None
    )
    engine = Engine.load(model, options)
    load_s = time.perf_counter() - started
    messages = [{"role": "user", "content": "My heart rate is 118 at rest. Should I worry?"}]
    result = engine.chat(messages, GenerationConfig(max_new_tokens=tokens, ignore_eos=True))
    return {
        "load_s": round(load_s, 3),
        "peak_rss_mb": round(_status_kib("VmHWM") / 1024, 1),
        "rss_mb": round(_status_kib("VmRSS") / 1024, 1),
        "anon_mb": round(_status_kib("RssAnon") / 1024, 1),
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


def measure(model: Path, threads: int, tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="edged-prepacked-") as tmp:
            cache = Path(tmp) / "prepacked"
            for config in CONFIGS:  # cold writes the copy that warm then reads
                samples[config].append(run(model, config, cache, threads, tokens))
                print(f"{config}: {samples[config][-1]}", file=sys.stderr)
    return {
        c: {k: statistics.median(s[k] for s in samples[c]) for k in samples[c][0]} for c in CONFIGS
    }


def render(model: Path, result: dict[str, dict[str, float]]) -> str:
    files = sum(p.stat().st_size for p in model.glob("model.onnx*")) / 2**20
    lines = [
        f"model {model} ({files:.0f} MB of graph files); medians; ratio to plain in brackets",
        f"{'':6} {'load s':>14} {'peak RSS MB':>18} {'RSS MB':>16} {'heap MB':>16} {'tok/s':>14}",
    ]
    base = result["plain"]
    for config in CONFIGS:
        row = result[config]
        cells = [
            f"{row[k]:8.2f} ({row[k] / base[k]:.2f})" if base[k] else f"{row[k]:8.2f}"
            for k in ("load_s", "peak_rss_mb", "rss_mb", "anon_mb", "decode_tok_s")
        ]
        lines.append(f"{config:6} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(str(args.model), args.cache, args.threads, args.tokens)))
        return 0
    result = measure(args.model, args.threads, args.tokens, args.repeats)
    print(render(args.model, result))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "medians": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
