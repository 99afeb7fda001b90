#!/usr/bin/env python3
"""Benchmark edged's engine against optimum's generate() and the onnxruntime-genai runtime.

    python tools/bench_engine.py                      # Qwen3-0.6B shape, 1 and 2 threads
    python tools/bench_engine.py --quick              # 4-layer smoke run, a minute or two
    python tools/bench_engine.py --json bench.json --threads 2 --engines edged,ort-genai

Per engine, graph and thread count, in a fresh process of its own (so peak RSS is that
engine's alone): prefill tokens/s on a 256-token prompt, decode tokens/s over 64 greedy new
tokens with EOS ignored, time to first token cold and (edged only) with a 200-token system
prompt in the prefix cache, and peak RSS. The model has the public Qwen3-0.6B shape with
random weights, built once into ~/.cache/edged/bench/ and exported both ways: optimum int4
(edged.export) and onnxruntime-genai's builder int4 (GroupQueryAttention). See tools/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path("~/.cache/edged/bench").expanduser()
RESULT_MARK = "BENCH-RESULT "

PROMPT_TOKENS = 256
SYSTEM_TOKENS = 200
NEW_TOKENS = 64
PROMPT_SEED = 1234
TOKEN_ID_RANGE = 1019
"""Prompt ids are drawn from the byte-level BPE part of the test tokenizer (no special tokens)."""

SHAPES: dict[str, dict[str, int]] = {
    # Qwen/Qwen3-0.6B config.json, with random weights.
    "qwen3-0.6b": {
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
    },
    # --quick: the same kind of model, small enough to build and run in CI-sized time.
    "quick": {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 32768,
        "max_position_embeddings": 4096,
    },
}
EXPORT_CONTEXT = 4096
"""Context the bench models are exported for (the manifest's limit, the GQA rotary tables)."""
BUSY_LIMIT_PCT = 10.0
"""A row during which other processes used more CPU than this (in % of all cores) is re-run."""
ENGINES = ("edged", "optimum", "ort-genai")
GRAPHS = ("optimum", "gqa")
GRAPH_OF_ENGINE = {"optimum": "optimum", "ort-genai": "gqa"}

# --------------------------------------------------------------------------------------------
# Workers: one engine, one graph, one thread count, in a process of its own. The ort-genai
# worker runs under the genai virtualenv's python, so this part imports nothing from edged and
# nothing outside the standard library at module level.
# --------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM).

    Not getrusage's ru_maxrss: Linux carries the parent's high-water mark across fork+exec,
    so a worker spawned by a parent that built a model would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _run_edged(spec: dict[str, Any]) -> dict[str, Any]:
    from edged.engine import Engine, EngineOptions, GenerationConfig

    prompt: list[int] = spec["prompt"]
    t0 = time.perf_counter()
    engine = Engine.load(
        spec["model_dir"],
        EngineOptions(threads=spec["threads"], context_length=spec["context"], verify_hashes=True),
    )
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    warm = GenerationConfig(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    engine.generate(prompt[:16], warm)
    full = GenerationConfig(max_new_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    runs = []
    for _ in range(spec["repeats"]):
        res = engine.generate(prompt, full)
        if res.cached_tokens:
            raise RuntimeError(f"cold run reused {res.cached_tokens} cached prompt tokens")
        if res.completion_tokens != spec["new_tokens"]:
            raise RuntimeError(
                f"generated {res.completion_tokens} tokens, not {spec['new_tokens']}"
            )
        timing = res.timing
        if timing.decode_tps is None or timing.first_token_ms is None:
            raise RuntimeError(f"generate() returned no decode timing: {timing}")
        runs.append(
            {
                "prefill_tps": len(prompt) / (timing.prefill_ms / 1000),
                "decode_tps": timing.decode_tps,
                "ttft_ms": timing.first_token_ms,
            }
        )
    out = _medians(runs)
    out["tokens"] = list(res.token_ids)
    engine.cache_prefix(prompt[: spec["system_tokens"]])
    first = GenerationConfig(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate(prompt, first)
    cached: list[float] = []
    for _ in range(spec["repeats"]):
        res = engine.generate(prompt, first)
        if res.cached_tokens != spec["system_tokens"] or res.timing.first_token_ms is None:
            raise RuntimeError(
                f"prefix cache served {res.cached_tokens} tokens, not {spec['system_tokens']}"
            )
        cached.append(res.timing.first_token_ms)
    out["ttft_cached_ms"] = statistics.median(cached)
    out.update(load_s=load_s, rss_after_load_mb=rss_loaded, layout=engine.describe())
    return out


def _run_optimum(spec: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    threads = spec["threads"]
    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(
        spec["model_dir"],
        file_name="model.onnx",
        session_options=so,
        provider="CPUExecutionProvider",
        use_cache=True,
    )
    # optimum takes hidden_size / heads as the head size; Qwen3 declares head_dim apart (128,
    # where 1024 / 16 = 64), and the empty first past would have the wrong shape.
    model.embed_size_per_head = model.config.head_dim
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:  # first call: the prompt; then one per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(ids: list[int], new: int) -> tuple[float, Clock, list[int]]:
        x = torch.tensor([ids])
        clock = Clock()
        start = time.perf_counter()
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new,
            # min_new_tokens masks EOS: 64 tokens however the random model ranks it.
            min_new_tokens=new,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
        return start, clock, out[0, len(ids) :].tolist()

    prompt: list[int] = spec["prompt"]
    new = spec["new_tokens"]
    generate(prompt[:16], 4)
    runs = []
    for _ in range(spec["repeats"]):
        start, clock, tokens = generate(prompt, new)
        first, last = clock.times[1], clock.times[-1]
        runs.append(
            {
                "prefill_tps": len(prompt) / (first - start),
                "decode_tps": (len(clock.times) - 2) / (last - first),
                "ttft_ms": (first - start) * 1000,
            }
        )
    out = _medians(runs)
    out.update(tokens=tokens, load_s=load_s, rss_after_load_mb=rss_loaded)
    return out


def _run_ort_genai(spec: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime_genai as og

    threads = spec["threads"]
    prompt: list[int] = spec["prompt"]
    new = spec["new_tokens"]
    t0 = time.perf_counter()
    config = og.Config(spec["model_dir"])
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()

    def generate(ids: list[int], n: int) -> tuple[float, float, float, float, list[int]]:
        params = og.GeneratorParams(model)
        # max_length sizes the shared KV buffers (zeroed up front); min_length masks EOS.
        params.set_search_options(
            max_length=spec["context"], min_length=len(ids) + n, do_sample=False
        )
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)  # the prefill
        prefilled = time.perf_counter()
        tokens = []
        first = 0.0
        for i in range(n):
            generator.generate_next_token()  # the first call only picks from the prompt's logits
            tokens.append(int(generator.get_next_tokens()[0]))
            if i == 0:
                first = time.perf_counter()
        return start, prefilled, first, time.perf_counter(), tokens

    generate(prompt[:16], 4)
    runs = []
    for _ in range(spec["repeats"]):
        start, prefilled, first, last, tokens = generate(prompt, new)
        runs.append(
            {
                "prefill_tps": len(prompt) / (prefilled - start),
                "decode_tps": (new - 1) / (last - first),
                "ttft_ms": (first - start) * 1000,
            }
        )
    out = _medians(runs)
    out.update(tokens=tokens, load_s=load_s, rss_after_load_mb=rss_loaded)
    return out


def _medians(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = runs[0].keys()
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["spread"] = {k: [round(r[k], 2) for r in runs] for k in keys}
    return out


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    run = {"edged": _run_edged, "optimum": _run_optimum, "ort-genai": _run_ort_genai}
    result = run[spec["engine"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------------------------
# The driver: build the benchmark models once, run every worker, report.
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_dirs(shape_name: str, last_token_logits: bool) -> dict[str, Path]:
    tag = f"{shape_name}-{'last' if last_token_logits else 'all'}-logits"
    root = CACHE_ROOT / shape_name
    return {
        "root": root,
        "checkpoint": root / "checkpoint",
        "optimum": root / f"optimum-int4-{tag}",
        "gqa": root / f"gqa-int4-{tag}",
    }


def build_checkpoint(out: Path, shape: dict[str, int]) -> None:
    """A Qwen3 checkpoint of `shape` with random weights and the test tokenizer, built by the
    test-model tool (same seed and init), greedy by default."""
    import make_test_model  # a sibling script: its directory is on sys.path

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    make_test_model.build_checkpoint(partial, shape, sampling_defaults=False)
    partial.rename(out)


def prepare_models(shape_name: str, last_token_logits: bool) -> dict[str, Path]:
    """Build (once) the checkpoint and both int4 exports; return their directories."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from edged.engine.manifest import MANIFEST_NAME
    from edged.export import ExportOptions, export_model

    dirs = model_dirs(shape_name, last_token_logits)
    if not (dirs["checkpoint"] / "config.json").is_file():
        log(f"building the {shape_name} checkpoint (random weights) in {dirs['checkpoint']}")
        build_checkpoint(dirs["checkpoint"], SHAPES[shape_name])
    for graph, exporter in (("optimum", "optimum"), ("gqa", "ort-genai")):
        if (dirs[graph] / MANIFEST_NAME).is_file():
            continue
        log(f"exporting {graph} int4 with exporter {exporter} into {dirs[graph]}")
        started = time.perf_counter()
        export_model(
            ExportOptions(
                source=str(dirs["checkpoint"]),
                output=dirs[graph],
                quant="int4",
                exporter=exporter,
                name=f"bench-{shape_name}-{graph}-int4",
                context_length=min(EXPORT_CONTEXT, SHAPES[shape_name]["max_position_embeddings"]),
                verify=False,
                last_token_logits=last_token_logits,
                progress=False,
                overwrite=True,
            )
        )
        log(f"  took {time.perf_counter() - started:.0f} s")
    return dirs


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def prompt_ids() -> list[int]:
    import random

    rng = random.Random(PROMPT_SEED)
    return [rng.randrange(TOKEN_ID_RANGE) for _ in range(PROMPT_TOKENS)]


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


def run_worker(
    engine: str, graph: str, threads: int, model_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    spec = {
        "engine": engine,
        "graph": graph,
        "threads": threads,
        "model_dir": str(model_dir),
        "context": args.context,
        "prompt": prompt_ids(),
        "system_tokens": SYSTEM_TOKENS,
        "new_tokens": NEW_TOKENS,
        "repeats": args.repeats,
    }
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if engine == "ort-genai":
        from edged.export.genai_builder import ensure_genai_venv, genai_python

        python = str(genai_python(ensure_genai_venv()))
        env.pop("PYTHONPATH", None)
    else:
        python = sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    idle_pct = wait_for_idle(args.idle_wait, BUSY_LIMIT_PCT)
    started = time.perf_counter()
    busy0, ours0 = _cpu_seconds()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    busy1, ours1 = _cpu_seconds()
    wall = time.perf_counter() - started
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
    row: dict[str, Any] = {"engine": engine, "threads": threads, "graph": graph}
    # CPU the rest of the machine used while the worker ran, in % of all cores: a row measured
    # beside another busy process is not comparable, and this says which rows were.
    row["others_cpu_pct"] = round(100 * others / (wall * (os.cpu_count() or 1)), 1)
    row["busy_before_pct"] = round(idle_pct, 1)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
    if proc.returncode != 0 or result is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        row["error"] = f"worker exit {proc.returncode}: {tail}"
        return row
    for key in ("prefill_tps", "decode_tps", "ttft_ms", "ttft_cached_ms", "peak_rss_mb"):
        if key in result:
            row[key] = round(result[key], 2)
    row.update(
        rss_after_load_mb=round(result["rss_after_load_mb"], 1),
        load_s=round(result["load_s"], 2),
        wall_s=round(wall, 1),
        spread=result["spread"],
        tokens=result["tokens"],
    )
    if "layout" in result:
        row["layout"] = result["layout"]
    return row


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_mb"] = int(line.split()[1]) // 1024
    except OSError:
        pass
    from importlib import metadata

    for dist in ("onnxruntime", "optimum", "optimum-onnx", "transformers", "torch", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    try:
        from edged.export.genai_builder import genai_venv_path

        stamp = json.loads((genai_venv_path() / "edged-venv.json").read_text())
        info["genai_venv"] = stamp.get("versions", {})
    except (OSError, ValueError, ImportError):
        pass
    return info


def model_info(shape_name: str, dirs: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    return {
        "shape": shape_name,
        **shape,
        "tie_word_embeddings": True,
        "initializer_range": 0.5,
        "weights": "random",
        "quant": "int4 (MatMulNBits block 32, accuracy level 4)",
        "logits": "last" if not args.all_logits else "all",
        "context_length": args.context,
        "prompt_tokens": PROMPT_TOKENS,
        "system_prompt_tokens": SYSTEM_TOKENS,
        "new_tokens": NEW_TOKENS,
        "repeats": args.repeats,
        "disk_mb": {
            "checkpoint": round(_dir_mb(dirs["checkpoint"]), 1),
            "optimum": round(_dir_mb(dirs["optimum"]), 1),
            "gqa": round(_dir_mb(dirs["gqa"]), 1),
        },
        "dirs": {k: str(v) for k, v in dirs.items() if k != "root"},
    }


def ratios(results: list[dict[str, Any]]) -> dict[str, float | None]:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {}
    top = max(r["threads"] for r in ok)

    def find(engine: str, graph: str) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in ok
                if r["engine"] == engine and r["graph"] == graph and r["threads"] == top
            ),
            None,
        )

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
        if a is None or b is None or not a.get(key) or not b.get(key):
            return None
        return round(a[key] / b[key], 3)

    edged_gqa, edged_opt = find("edged", "gqa"), find("edged", "optimum")
    genai, optimum = find("ort-genai", "gqa"), find("optimum", "optimum")
    edged_main = edged_gqa or edged_opt
    cached = None
    if edged_main and edged_main.get("ttft_cached_ms") and edged_main.get("ttft_ms"):
        cached = round(edged_main["ttft_cached_ms"] / edged_main["ttft_ms"], 3)
    return {
        "threads": top,
        "decode_vs_ort_genai": ratio(edged_gqa, genai, "decode_tps"),
        "decode_vs_optimum": ratio(edged_opt, optimum, "decode_tps"),
        "ttft_cached_vs_cold": cached,
        "prefill_vs_ort_genai": ratio(edged_gqa, genai, "prefill_tps"),
        "prefill_vs_optimum": ratio(edged_opt, optimum, "prefill_tps"),
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'engine':<10} {'graph':<8} {'thr':>3} {'prefill t/s':>11} {'decode t/s':>10} "
        f"{'ttft ms':>8} {'ttft cached':>11} {'peak RSS MB':>11}"
    )
    lines = [head, "-" * len(head)]

    def fmt(value: Any, width: int, digits: int = 1) -> str:
        return (
            f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
        )

    for r in results:
        if "error" in r:
            lines.append(f"{r['engine']:<10} {r['graph']:<8} {r['threads']:>3}  FAILED: ")
            lines.append("    " + r["error"].replace("\n", "\n    "))
            continue
        lines.append(
            f"{r['engine']:<10} {r['graph']:<8} {r['threads']:>3} {fmt(r.get('prefill_tps'), 11)} "
            f"{fmt(r.get('decode_tps'), 10)} {fmt(r.get('ttft_ms'), 8, 0)} "
            f"{fmt(r.get('ttft_cached_ms'), 11, 0)} {fmt(r.get('peak_rss_mb'), 11, 0)}"
            + ("  * disturbed" if r.get("disturbed") else "")
        )
    if any(r.get("disturbed") for r in results):
        lines.append(f"* other processes used > {BUSY_LIMIT_PCT:.0f} % CPU during every try")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}"
    )
    parser.add_argument(
        "--graphs", default=",".join(GRAPHS), help="graphs edged runs on: optimum,gqa"
    )
    parser.add_argument("--quick", action="store_true", help="4-layer model: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument(
        "--context", type=int, default=1024, help="KV capacity in tokens for edged and ort-genai"
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=300.0,
        help="seconds to wait for an idle machine before each measurement (300)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-runs of a measurement disturbed by other processes (2)",
    )
    parser.add_argument(
        "--all-logits",
        action="store_true",
        help="export graphs with logits for every position (default: last position only)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    bad = [e for e in engines if e not in ENGINES] + [g for g in graphs if g not in GRAPHS]
    if bad or not threads or min(threads) < 1:
        parser.error(f"--engines/--graphs/--threads: unknown or invalid {bad or args.threads}")
    if args.context < PROMPT_TOKENS + NEW_TOKENS:
        parser.error(f"--context = {args.context} is below {PROMPT_TOKENS + NEW_TOKENS}")
    shape_name = "quick" if args.quick else "qwen3-0.6b"

    dirs = prepare_models(shape_name, last_token_logits=not args.all_logits)
    plan: list[tuple[str, str]] = []
    for engine in engines:
        if engine == "edged":
            plan += [("edged", g) for g in graphs]
        else:
            plan.append((engine, GRAPH_OF_ENGINE[engine]))

    machine = machine_info()
    results = []
    for n in threads:
        for engine, graph in plan:
            log(f"running {engine} on the {graph} graph with {n} thread(s)")
            row = run_worker(engine, graph, n, dirs[graph], args)
            for _ in range(args.retries):
                if "error" in row or row["others_cpu_pct"] <= BUSY_LIMIT_PCT:
                    break
                log(f"  other processes took {row['others_cpu_pct']:.0f} % CPU meanwhile; again")
                row = run_worker(engine, graph, n, dirs[graph], args)
            row["disturbed"] = "error" not in row and row["others_cpu_pct"] > BUSY_LIMIT_PCT
            if "error" in row:
                log(f"  FAILED: {row['error']}")
            else:
                log(
                    f"  prefill {row['prefill_tps']:.1f} t/s, decode {row['decode_tps']:.1f} t/s, "
                    f"ttft {row['ttft_ms']:.0f} ms, peak RSS {row['peak_rss_mb']:.0f} MB, "
                    f"other processes {row['others_cpu_pct']:.0f} % CPU"
                )
            results.append(row)
    _check_same_tokens(results)
    report = {
        "machine": machine,
        "model": model_info(shape_name, dirs, args),
        "results": results,
        "ratios": ratios(results),
    }
    print(table(results))
    print()
    print(json.dumps(report["ratios"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


def _check_same_tokens(results: list[dict[str, Any]]) -> None:
    """Greedy decoding of one graph must give the same tokens in every engine and thread count.

    A mismatch is reported, not fatal: int8 activation quantization (accuracy level 4) can
    legitimately flip a near-tie between thread counts.
    """
    for graph in GRAPHS:
        seqs = {
            (r["engine"], r["threads"]): r["tokens"]
            for r in results
            if r["graph"] == graph and "tokens" in r
        }
        for row in results:
            if row["graph"] == graph and "tokens" in row:
                reference = next(iter(seqs.values()))
                row["same_tokens_as_first_row_of_graph"] = row["tokens"] == reference
        if len({tuple(s) for s in seqs.values()}) > 1:
            log(f"note: greedy tokens on the {graph} graph differ between rows: {sorted(seqs)}")
    for row in results:
        row.pop("tokens", None)


if __name__ == "__main__":
    sys.exit(main())
