#!/usr/bin/env python3
"""Benchmark edged's engine against optimum's generate(), onnxruntime-genai and llama.cpp.

    python tools/bench_engine.py                      # Qwen3-0.6B shape, 1 and 2 threads
    python tools/bench_engine.py --shape qwen3-1.7b   # edged and llama.cpp at 1.7B
    python tools/bench_engine.py --quick              # 4-layer smoke run, a few minutes
    python tools/bench_engine.py --json bench.json --threads 2 --engines edged,ort-genai

Per engine, graph and thread count, in a fresh process of its own (so peak RSS is that
engine's alone): prefill tokens/s on a 256-token prompt, decode tokens/s over 64 greedy new
tokens with EOS ignored, time to first token cold, with a 200-token prefix cached and (edged,
llama.cpp) for a chat prompt whose system turn is cached, and peak RSS. The model has a public
Qwen3 shape with random weights, built once into ~/.cache/edged/bench/<shape>/ and exported
by each exporter (edged's stream exporter, optimum, onnxruntime-genai's builder) and to GGUF
Q4_0 and Q4_K_M by llama.cpp's quantizer. The same run probes the memory bandwidth (for a
roofline column) and runs the speculative workload (tools/bench_spec.py). See tools/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_llama import LLAMA_TYPES
from bench_worker import BUSY_LIMIT_PCT, emit, medians, rss_mb, run_task
from make_test_model import QWEN3_SHAPES

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path("~/.cache/edged/bench").expanduser()

PROMPT_TOKENS = 256
SYSTEM_TOKENS = 200
NEW_TOKENS = 64
PROMPT_SEED = 1234
TOKEN_ID_RANGE = 1019
"""Prompt ids are drawn from the byte-level BPE part of the test tokenizer (no special tokens)."""

SHAPES: dict[str, dict[str, int]] = {
    **QWEN3_SHAPES,  # the public Qwen3 configs, with random weights
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
CHECKPOINT_DTYPE = {"qwen3-1.7b": "bfloat16", "qwen3-4b": "bfloat16"}
"""Bigger checkpoints are built in bf16, as the public ones are published (half the memory)."""
MEMORY_ONLY = ("qwen3-4b",)
"""Shapes measured for load time and peak RSS only: no decode."""
EXPORT_CONTEXT = 4096
"""Context the bench models are exported for (the manifest's limit, the GQA rotary tables)."""
ENGINES = ("edged", "optimum", "ort-genai", "llama.cpp")
GRAPHS: dict[str, dict[str, Any]] = {
    # name: edged.export.ExportOptions for it (int4 throughout)
    "optimum": {"exporter": "optimum"},
    "gqa": {"exporter": "ort-genai"},
    "stream": {"exporter": "stream"},  # edged's default export: 8-bit LM head, logits_to_keep
    "stream-int4": {"exporter": "stream", "lm_head_bits": 4, "block_size": 32},
    # `edged model export --block-size 64`: what the coarser blocks buy (not among the ratios:
    # their quality cost at this size is not measured here; README, "int4 quality")
    "stream-b64": {"exporter": "stream", "block_size": 64},
}
GRAPH_DIRS = {
    "optimum": "optimum-int4",
    "gqa": "gqa-int4",
    "stream": "stream-int4-head8",
    "stream-int4": "stream-int4-head4",
    "stream-b64": "stream-int4-head8-b64",
}
SHARED_KV_GRAPHS = ("gqa", "stream", "stream-int4")
"""Graphs with one in-place KV buffer per layer (GroupQueryAttention), edged's fast layout, in
blocks of 32 (the ratios compare these)."""
ENGINE_GRAPHS: dict[str, tuple[str, ...]] = {
    "optimum": ("optimum",),
    # stream-int4: the same quantization as gqa, from edged's exporter, which needs no 23 GB
    # (a decode comparison at 1.7B on one graph file: below, _run_ort_genai).
    "ort-genai": ("gqa", "stream-int4"),
    "llama.cpp": LLAMA_TYPES,
}
SHAPE_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # optimum's export was killed at 22.9 GB and onnxruntime-genai's builder peaked at 23.4 GB
    # (2026-12-02; 13.5 GB on 2026-12-07) for 1.7B on this 24 GB machine (README, "Export
    # memory"): not among edged's graphs unless asked (--graphs); the ort-genai engine still
    # runs on gqa, so a default run builds it.
    "qwen3-1.7b": (("edged", "ort-genai", "llama.cpp"), ("stream", "stream-int4")),
    "qwen3-4b": (("edged", "llama.cpp"), ("stream",)),
}
BANDWIDTH_MB = 1024
BANDWIDTH_REPEATS = 5

# --------------------------------------------------------------------------------------------
# Workers: one task in a process of its own (an engine on one graph and thread count, the
# bandwidth probe, a part of the speculative workload). The ort-genai and llama.cpp workers run
# under their virtualenvs' pythons, so this part imports nothing from edged and nothing outside
# the standard library at module level.
# --------------------------------------------------------------------------------------------


def _run_edged(spec: dict[str, Any]) -> dict[str, Any]:
    from edged.engine import Engine, EngineOptions, GenerationConfig

    t0 = time.perf_counter()
    engine = Engine.load(
        spec["model_dir"],
        # Speculation off: measured apart (bench_spec.py); random text would only pay for it.
        EngineOptions(
            threads=spec["threads"],
            context_length=spec["context"],
            verify_hashes=True,
            speculation=None,
        ),
    )
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "rss_after_load_mb": rss_mb()}
    out["layout"] = engine.describe()
    if spec.get("memory_only"):  # a short step through every kernel, no measurement
        warm = GenerationConfig(max_new_tokens=2, ignore_eos=True, speculate=False)
        engine.generate(spec["prompt"][:16], warm)
        return out
    out.update(_edged_decode(engine, spec))
    out["ttft_cached_ms"] = _edged_cached_ttft(engine, spec)
    out["ttft_chat_ms"] = _edged_chat_ttft(engine, spec)
    return out


def _edged_decode(engine: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from edged.engine import GenerationConfig

    prompt: list[int] = spec["prompt"]
    new = spec["new_tokens"]
    warm = GenerationConfig(max_new_tokens=4, ignore_eos=True, speculate=False)
    engine.generate(prompt[:16], warm)
    full = GenerationConfig(max_new_tokens=new, ignore_eos=True, speculate=False)
    runs = []
    for _ in range(spec["repeats"]):
        res = engine.generate(prompt, full)
        if res.cached_tokens:
            raise RuntimeError(f"cold run reused {res.cached_tokens} cached prompt tokens")
        if res.completion_tokens != new:
            raise RuntimeError(f"generated {res.completion_tokens} tokens, not {new}")
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
    return {**medians(runs), "tokens": list(res.token_ids)}


def _first_token_ms(engine: Any, ids: list[int], cached: int, repeats: int) -> float:
    """Median time to the first token of `ids` whose first `cached` tokens the prefix cache
    holds (checked)."""
    from edged.engine import GenerationConfig

    first = GenerationConfig(max_new_tokens=1, ignore_eos=True, speculate=False)
    engine.generate(ids, first)
    times: list[float] = []
    for _ in range(repeats):
        res = engine.generate(ids, first)
        if res.cached_tokens != cached or res.timing.first_token_ms is None:
            raise RuntimeError(f"prefix cache served {res.cached_tokens} tokens, not {cached}")
        times.append(res.timing.first_token_ms)
    return statistics.median(times)


def _edged_cached_ttft(engine: Any, spec: dict[str, Any]) -> float:
    """The 256-token prompt with its first 200 tokens in the prefix cache."""
    engine.cache_prefix(spec["prompt"][: spec["system_tokens"]])
    return _first_token_ms(engine, spec["prompt"], spec["system_tokens"], spec["repeats"])


def _edged_chat_ttft(engine: Any, spec: dict[str, Any]) -> float:
    """A chat prompt as the daemon sends it: the system prompt cached (set_system_prompt), the
    vitals block and question computed."""
    chat = spec["chat"]
    cached = engine.set_system_prompt(chat["messages"][0]["content"])
    ids = engine.render_chat(chat["messages"], enable_thinking=False)
    if cached != len(chat["system_ids"]) or ids != chat["ids"]:
        raise RuntimeError("the chat prompt renders differently in the worker and the driver")
    return _first_token_ms(engine, ids, cached, spec["repeats"])


def _load_optimum(spec: dict[str, Any]) -> Any:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(spec["threads"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    so.inter_op_num_threads = 1
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
    return model


def _optimum_generate(model: Any, ids: list[int], new: int) -> tuple[float, list[float], list[int]]:
    """(start, the streamer's clock: prompt then one time per new token, the new tokens)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:  # first call: the prompt; then one per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

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
    return start, clock.times, out[0, len(ids) :].tolist()


def _run_optimum(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = _load_optimum(spec)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    prompt: list[int] = spec["prompt"]
    _optimum_generate(model, prompt[:16], 4)
    runs = []
    for _ in range(spec["repeats"]):
        start, times, tokens = _optimum_generate(model, prompt, spec["new_tokens"])
        first, last = times[1], times[-1]
        runs.append(
            {
                "prefill_tps": len(prompt) / (first - start),
                "decode_tps": (len(times) - 2) / (last - first),
                "ttft_ms": (first - start) * 1000,
            }
        )
    out = medians(runs)
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
    # A graph with a logits_to_keep input (edged's stream exporter) returns the last position's
    # logits, and onnxruntime-genai binds an output for every prompt position: it can run the
    # graph one token at a time only. Its decode is measured; its prefill is not.
    one_at_a_time = b"logits_to_keep" in (Path(spec["model_dir"]) / "model.onnx").read_bytes()

    def generate(ids: list[int], n: int) -> tuple[float, float, float, float, list[int]]:
        params = og.GeneratorParams(model)
        # max_length sizes the shared KV buffers (zeroed up front); min_length masks EOS.
        params.set_search_options(
            max_length=spec["context"], min_length=len(ids) + n, do_sample=False
        )
        generator = og.Generator(model, params)
        start = time.perf_counter()
        if one_at_a_time:
            for token in ids:
                generator.append_tokens([token])
        else:
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
                "prefill_tps": None if one_at_a_time else len(prompt) / (prefilled - start),
                "decode_tps": (new - 1) / (last - first),
                "ttft_ms": None if one_at_a_time else (first - start) * 1000,
            }
        )
    out = medians(runs)
    out.update(tokens=tokens, load_s=load_s, rss_after_load_mb=rss_loaded)
    if one_at_a_time:
        out["note"] = "prompt fed one token at a time (graph with logits_to_keep): decode only"
    return out


def _run_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory read bandwidth in GB/s per thread count: the best of a few passes of a read-only
    reduction (max) over a 1 GiB float32 array, split between the threads. numpy's sum is not
    used: its pairwise summation is compute-bound on this CPU (about half max's rate)."""
    import threading

    import numpy as np

    data = np.ones(spec["mb"] * 2**20 // 4, dtype=np.float32)

    def pass_seconds(n: int) -> float:
        parts = np.array_split(data, n)
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]  # releases the GIL
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start

    out: dict[str, float] = {}
    for n in spec["thread_counts"]:
        pass_seconds(n)
        best = min(pass_seconds(n) for _ in range(spec["repeats"]))
        out[str(n)] = round(data.nbytes / best / 1e9, 2)
    return {"gb_per_s": out, "mb": spec["mb"], "method": "numpy max, best of passes"}


LOCAL_WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "edged": _run_edged,
    "optimum": _run_optimum,
    "ort-genai": _run_ort_genai,
    "bandwidth": _run_bandwidth,
}
SIBLING_WORKERS = {
    "llama.cpp": ("bench_llama", "run_llama"),
    "llama-lookup": ("bench_llama", "run_lookup"),
    "spec-demo": ("bench_spec", "run_demo"),
    "spec-replay": ("bench_spec", "run_replay"),
    "spec-open": ("bench_spec", "run_open_ended"),
    "genai-ngram": ("bench_spec", "run_genai_ngram"),
}


def worker_main() -> int:
    """Run the task the driver sent on stdin; print its result for the driver."""
    spec = json.loads(sys.stdin.read())
    task = spec["task"]
    run = LOCAL_WORKERS.get(task)
    if run is None:
        module, name = SIBLING_WORKERS[task]
        run = getattr(importlib.import_module(module), name)
    emit(run(spec))
    return 0


# --------------------------------------------------------------------------------------------
# The driver: build the benchmark models once, run every worker, report.
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_dirs(shape_name: str, last_token_logits: bool) -> dict[str, Path]:
    tag = f"{shape_name}-{'last' if last_token_logits else 'all'}-logits"
    root = CACHE_ROOT / shape_name
    dirs = {"root": root, "checkpoint": root / "checkpoint", "gguf": root / "gguf"}
    dirs.update({graph: root / f"{stem}-{tag}" for graph, stem in GRAPH_DIRS.items()})
    return dirs


def build_checkpoint(out: Path, shape_name: str) -> None:
    """A Qwen3 checkpoint of the shape with random weights and the test tokenizer, built by the
    test-model tool (same seed and init), greedy by default."""
    import make_test_model  # a sibling script: its directory is on sys.path

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    make_test_model.build_checkpoint(
        partial,
        SHAPES[shape_name],
        sampling_defaults=False,
        dtype=CHECKPOINT_DTYPE.get(shape_name, "float32"),
    )
    partial.rename(out)


def export_graph(graph: str, dirs: dict[str, Path], shape_name: str, last: bool) -> None:
    from edged.export import ExportOptions, export_model

    log(f"exporting {graph} int4 ({GRAPHS[graph]}) into {dirs[graph]}")
    started = time.perf_counter()
    export_model(
        ExportOptions(
            source=str(dirs["checkpoint"]),
            output=dirs[graph],
            quant="int4",
            name=f"bench-{shape_name}-{graph}",
            context_length=min(EXPORT_CONTEXT, SHAPES[shape_name]["max_position_embeddings"]),
            verify=False,
            last_token_logits=last,
            progress=False,
            overwrite=True,
            **GRAPHS[graph],
        )
    )
    log(f"  took {time.perf_counter() - started:.0f} s")


def prepare_models(
    shape_name: str, graphs: list[str], llama: bool, last_token_logits: bool
) -> tuple[dict[str, Path], dict[str, Path]]:
    """Build (once) the checkpoint, the graphs asked for and (for llama.cpp) the GGUF files;
    (the cache's directories, {graph: its model directory or GGUF file})."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from edged.engine.manifest import MANIFEST_NAME

    dirs = model_dirs(shape_name, last_token_logits)
    if not (dirs["checkpoint"] / "config.json").is_file():
        log(f"building the {shape_name} checkpoint (random weights) in {dirs['checkpoint']}")
        build_checkpoint(dirs["checkpoint"], shape_name)
    for graph in graphs:
        if not (dirs[graph] / MANIFEST_NAME).is_file():
            export_graph(graph, dirs, shape_name, last_token_logits)
    paths = {graph: dirs[graph] for graph in graphs}
    if llama:
        import bench_llama

        paths.update(bench_llama.prepare_ggufs(dirs["checkpoint"], dirs["gguf"], LLAMA_TYPES, log))
    return dirs, paths


def model_bytes(path: Path) -> int:
    """The weights an engine reads: the graph and its data file, or the GGUF file."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("model.onnx*"))


def prompt_ids() -> list[int]:
    import random

    rng = random.Random(PROMPT_SEED)
    return [rng.randrange(TOKEN_ID_RANGE) for _ in range(PROMPT_TOKENS)]


def chat_prompt(checkpoint: Path) -> dict[str, Any]:
    """The first held-out dialogue's question as the daemon asks it (edged's system prompt, the
    vitals block, the question), in the bench model's tokenizer: the system turn is cached,
    the rest is computed."""
    from edged.engine.tokenizer import ChatTokenizer
    from edged.eval.datasets import DEFAULT_FILES, load

    messages = load([DEFAULT_FILES[0]])[0].data["messages"][:2]
    tokenizer = ChatTokenizer.from_dir(checkpoint)
    system = tokenizer.render(messages[:1], add_generation_prompt=False)
    full = tokenizer.render(messages, enable_thinking=False)
    system_ids, ids = tokenizer.encode(system), tokenizer.encode(full)
    if ids[: len(system_ids)] != system_ids:
        raise RuntimeError("the chat template renders the system turn differently in a chat")
    return {"messages": messages, "system_ids": system_ids, "ids": ids}


def row_spec(
    engine: str, graph: str, threads: int, path: Path, args: argparse.Namespace, chat: Any
) -> dict[str, Any]:
    return {
        "engine": engine,
        "graph": graph,
        "threads": threads,
        "model_dir": str(path),
        "context": args.context,
        "prompt": prompt_ids(),
        "system_tokens": SYSTEM_TOKENS,
        "new_tokens": NEW_TOKENS,
        "repeats": args.repeats,
        "chat": chat,
        "memory_only": args.shape in MEMORY_ONLY,
    }


def _row(spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: spec[k] for k in ("engine", "threads", "graph")}
    row.update({k: result[k] for k in ("others_cpu_pct", "busy_before_pct", "wall_s")})
    if "error" in result:
        return {**row, "error": result["error"]}
    keys = ("prefill_tps", "decode_tps", "ttft_ms", "ttft_cached_ms", "ttft_chat_ms")
    for key in (*keys, "peak_rss_mb"):
        if result.get(key) is not None:
            row[key] = round(result[key], 2)
    row.update(rss_after_load_mb=round(result["rss_after_load_mb"], 1))
    row.update(load_s=round(result["load_s"], 2), model_mb=round(spec["model_mb"], 1))
    for key in ("spread", "tokens", "layout"):
        if key in result:
            row[key] = result[key]
    if result.get("note"):
        row["note"] = result["note"]
    if spec["memory_only"]:
        row["note"] = "memory only: load, no decode"
    return row


def measure_row(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One row, re-run while other processes disturbed it (`--retries`). llama.cpp first runs
    with its defaults and, if that fails (its AMX path crashed on some shapes here), again
    without its extra buffer types; the row says which setting it used."""
    log(f"running {spec['engine']} on the {spec['graph']} graph with {spec['threads']} thread(s)")
    result = run_task(spec["engine"], spec, args.idle_wait)
    fallback = None
    if spec["engine"] == "llama.cpp" and "error" in result:
        fallback = result["error"].strip().splitlines()[0][:200]
        log(f"  llama.cpp's defaults failed ({fallback}); again without extra buffer types")
        spec = {**spec, "extra_bufts": False}
        result = run_task(spec["engine"], spec, args.idle_wait)
    for _ in range(args.retries):
        if "error" in result or result["others_cpu_pct"] <= BUSY_LIMIT_PCT:
            break
        log(f"  other processes took {result['others_cpu_pct']:.0f} % CPU meanwhile; again")
        result = run_task(spec["engine"], spec, args.idle_wait)
    row = _row(spec, result)
    row["disturbed"] = "error" not in row and row["others_cpu_pct"] > BUSY_LIMIT_PCT
    if fallback is not None:
        row["note"] = f"extra buffer types off: the default failed ({fallback.split(':')[0]})"
        row["llama_default_error"] = fallback
    _log_row(row)
    return row


def _log_row(row: dict[str, Any]) -> None:
    if "error" in row:
        log(f"  FAILED: {row['error']}")
        return
    parts = [f"load {row['load_s']:.1f} s"]
    # a row may lack some figures: genai feeding a prompt one token at a time has no prefill
    for key, label, unit, digits in (
        ("prefill_tps", "prefill", "t/s", 1),
        ("decode_tps", "decode", "t/s", 1),
        ("ttft_ms", "ttft", "ms", 0),
        ("peak_rss_mb", "peak RSS", "MB", 0),
    ):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.{digits}f} {unit}")
    if "decode_tps" in row:
        parts.append(f"other processes {row['others_cpu_pct']:.0f} % CPU")
    log("  " + ", ".join(parts))
    if row.get("note"):
        log(f"  note: {row['note']}")


# Fields of a row that are one figure per round: the row gives their median.
_PER_ROUND = (
    "prefill_tps",
    "decode_tps",
    "ttft_ms",
    "ttft_cached_ms",
    "ttft_chat_ms",
    "load_s",
    "rss_after_load_mb",
)


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the same measurement in every round (each in a fresh process): the
    median of each figure, the highest peak RSS and CPU use of others, every run's value in
    `spread`. A VM's speed drifts by 20 % over minutes here; engines measured in turn, round
    after round, meet the same drift, where engines measured one after the other do not."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[0]
    out = dict(ok[0])
    for key in _PER_ROUND:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 2)
    for key in ("peak_rss_mb", "others_cpu_pct"):
        if all(key in r for r in ok):
            out[key] = max(r[key] for r in ok)
    out["disturbed"] = any(r.get("disturbed") for r in ok)
    spread: dict[str, list[float]] = {}
    for r in ok:
        for key, values in r.get("spread", {}).items():
            spread.setdefault(key, []).extend(values)
    if spread:
        out["spread"] = spread
    out["rounds"] = len(ok)
    if len(ok) < len(rows):
        out["failed_rounds"] = len(rows) - len(ok)
    return out


def kv_bytes_per_token(shape: dict[str, int], engine: str) -> int:
    """K and V of every layer for one position: float32 in the onnxruntime graphs, f16 in
    llama.cpp's cache."""
    itemsize = 2 if engine == "llama.cpp" else 4
    heads = shape["num_key_value_heads"] * shape["head_dim"]
    return 2 * shape["num_hidden_layers"] * heads * itemsize


def add_roofline(row: dict[str, Any], shape: dict[str, int], bandwidth: dict[str, float]) -> None:
    """The share of the measured memory bandwidth a decode row uses, if every step read all the
    weights and the KV cache at the mean depth once: (weight bytes + KV bytes) x decode
    tokens/s / bandwidth at the row's thread count (the best at that many threads or fewer)."""
    usable = [gbps for n, gbps in bandwidth.items() if int(n) <= row["threads"]]
    if not usable or not row.get("decode_tps"):
        return
    depth = PROMPT_TOKENS + NEW_TOKENS / 2
    per_token = row["model_mb"] * 2**20 + kv_bytes_per_token(shape, row["engine"]) * depth
    row["bytes_per_token_mb"] = round(per_token / 2**20, 1)
    row["roofline"] = round(per_token * row["decode_tps"] / (max(usable) * 1e9), 3)


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


def model_info(
    shape_name: str, paths: dict[str, Path], chat: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "shape": shape_name,
        **SHAPES[shape_name],
        "tie_word_embeddings": True,
        "initializer_range": 0.5,
        "weights": "random",
        "checkpoint_dtype": CHECKPOINT_DTYPE.get(shape_name, "float32"),
        "quant": "int4 (MatMulNBits block 32, accuracy level 4); llama.cpp Q4_0, Q4_K_M",
        "graphs": {g: GRAPHS.get(g, "llama.cpp quantizer") for g in paths},
        "logits": "last" if not args.all_logits else "all",
        "context_length": args.context,
        "prompt_tokens": PROMPT_TOKENS,
        "system_prompt_tokens": SYSTEM_TOKENS,
        "chat_prompt_tokens": {"cached": len(chat["system_ids"]), "total": len(chat["ids"])},
        "new_tokens": NEW_TOKENS,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "model_mb": {g: round(model_bytes(p) / 2**20, 1) for g, p in paths.items()},
        "paths": {g: str(p) for g, p in paths.items()},
    }


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def _share(row: dict[str, Any] | None, part: str, whole: str) -> float | None:
    if row is None or not row.get(part) or not row.get(whole):
        return None
    return round(row[part] / row[whole], 3)


def _label(*rows: dict[str, Any] | None) -> str | None:
    if not all(rows):
        return None
    return " / ".join(f"{r['engine']} {r['graph']}" for r in rows if r)


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparisons of issue #13 at the highest thread count run (see tools/README.md)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {}
    top = max(r["threads"] for r in ok)
    at_top = [r for r in ok if r["threads"] == top]

    def find(engine: str, graph: str) -> dict[str, Any] | None:
        return next((r for r in at_top if r["engine"] == engine and r["graph"] == graph), None)

    def best(engine: str, graphs: tuple[str, ...], key: str) -> dict[str, Any] | None:
        rows = [r for r in at_top if r["engine"] == engine and r["graph"] in graphs]
        rows = [r for r in rows if r.get(key)]
        return max(rows, key=lambda r: r[key]) if rows else None

    edged_gqa, edged_opt = find("edged", "gqa"), find("edged", "optimum")
    # edged against onnxruntime-genai on one graph file both ran: the builder's if edged ran
    # it, else edged's all-int4 stream graph (decode only: genai runs that one token at a time).
    both = [g for g in ("gqa", "stream-int4") if find("edged", g) and find("ort-genai", g)]
    genai_graph = both[0] if both else "gqa"
    edged_same, genai = find("edged", genai_graph), find("ort-genai", genai_graph)
    edged_best = best("edged", SHARED_KV_GRAPHS, "decode_tps")
    llama_best = best("llama.cpp", LLAMA_TYPES, "decode_tps")
    edged_prefill = best("edged", SHARED_KV_GRAPHS, "prefill_tps")
    llama_prefill = best("llama.cpp", LLAMA_TYPES, "prefill_tps")
    default = find("edged", "stream") or edged_gqa or edged_opt
    memory = edged_best or default
    files = None
    if memory and memory.get("peak_rss_mb") and "layout" in memory:
        budget = memory["model_mb"] + memory["layout"]["kv_cache_mb"]
        files = round(memory["peak_rss_mb"] / budget, 3)  # KV: the preallocated buffers
    return {
        "threads": top,
        "decode_vs_ort_genai": _ratio(edged_same, genai, "decode_tps"),
        "decode_vs_ort_genai_rows": _label(edged_same, genai),
        "decode_vs_optimum": _ratio(edged_opt, find("optimum", "optimum"), "decode_tps"),
        "ttft_cached_vs_cold": _share(default, "ttft_cached_ms", "ttft_ms"),
        "ttft_cached_vs_cold_row": _label(default),
        "decode_vs_llamacpp": _ratio(edged_best, llama_best, "decode_tps"),
        "decode_vs_llamacpp_rows": _label(edged_best, llama_best),
        "prefill_vs_llamacpp": _ratio(edged_prefill, llama_prefill, "prefill_tps"),
        "prefill_vs_llamacpp_rows": _label(edged_prefill, llama_prefill),
        "peak_rss_vs_files": files,
        "peak_rss_vs_files_row": _label(memory),
        "prefill_vs_ort_genai": _ratio(edged_same, genai, "prefill_tps"),
        "prefill_vs_optimum": _ratio(edged_opt, find("optimum", "optimum"), "prefill_tps"),
    }


def _cell(value: Any, width: int, digits: int = 1) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:>{width}.{digits}f}" if ok else f"{'-':>{width}}"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'engine':<10} {'graph':<11} {'thr':>3} {'prefill t/s':>11} {'decode t/s':>10} "
        f"{'roof':>5} {'ttft ms':>8} {'ttft cached':>11} {'ttft chat':>9} {'peak RSS MB':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        start = f"{r['engine']:<10} {r['graph']:<11} {r['threads']:>3}"
        if "error" in r:
            lines.append(f"{start}  FAILED: ")
            lines.append("    " + r["error"].replace("\n", "\n    "))
            continue
        notes = [r["note"]] if r.get("note") else []
        notes += ["* disturbed"] if r.get("disturbed") else []
        lines.append(
            f"{start} {_cell(r.get('prefill_tps'), 11)} {_cell(r.get('decode_tps'), 10)} "
            f"{_cell(r.get('roofline'), 5, 2)} {_cell(r.get('ttft_ms'), 8, 0)} "
            f"{_cell(r.get('ttft_cached_ms'), 11, 0)} {_cell(r.get('ttft_chat_ms'), 9, 0)} "
            f"{_cell(r.get('peak_rss_mb'), 11, 0)}" + "".join(f"  {n}" for n in notes)
        )
    if any(r.get("disturbed") for r in results):
        lines.append(f"* other processes used > {BUSY_LIMIT_PCT:.0f} % CPU during every try")
    return "\n".join(lines)


def _check_same_tokens(results: list[dict[str, Any]]) -> None:
    """Greedy decoding of one graph must give the same tokens in every engine and thread count.

    A mismatch is reported, not fatal: int8 activation quantization (accuracy level 4) can
    legitimately flip a near-tie between thread counts.
    """
    for graph in dict.fromkeys(r["graph"] for r in results):
        rows = [r for r in results if r["graph"] == graph and "tokens" in r]
        seqs = {(r["engine"], r["threads"]): r["tokens"] for r in rows}
        for row in rows:
            row["same_tokens_as_first_row_of_graph"] = row["tokens"] == rows[0]["tokens"]
        if len({tuple(s) for s in seqs.values()}) > 1:
            log(f"note: greedy tokens on the {graph} graph differ between rows: {sorted(seqs)}")
    for row in results:
        row.pop("tokens", None)


def run_speculative(
    args: argparse.Namespace,
    paths: dict[str, Path],
    engines: list[str],
    threads: int,
) -> dict[str, Any]:
    """The speculative workload (tools/bench_spec.py); {} when it is not asked for."""
    import bench_spec

    if args.spec_dialogues <= 0 or "edged" not in engines:
        return {}
    replay = next((g for g in ("stream", "stream-int4") if g in paths), None)
    if args.shape in MEMORY_ONLY:
        replay = None
    plan = bench_spec.SpecPlan(
        dialogues=args.spec_dialogues,
        threads=threads,
        context=args.context,
        cache_root=CACHE_ROOT,
        replay_dir=paths[replay] if replay else None,
        replay_label=f"{args.shape}, {replay}",
        prompt=prompt_ids(),
        llama="llama.cpp" in engines,
        genai="ort-genai" in engines,
        rounds=args.rounds,
    )
    workload = bench_spec.run_workload(
        plan, lambda task, spec: run_task(task, spec, args.idle_wait), log
    )
    for part, engine in (("llama_lookup", "llama.cpp"), ("genai_ngram", "ort-genai")):
        if engine not in engines:
            workload[f"{part}_note"] = f"not run: {engine} is not among --engines"
    return workload


def _parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--worker", action="store_true", help=argparse.SUPPRESS)
    add("--json", type=Path, help="write the results as JSON to this file")
    add("--shape", choices=tuple(SHAPES), default=None, help="model shape (qwen3-0.6b)")
    add("--quick", action="store_true", help="the same as --shape quick: a smoke run")
    add("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    add("--engines", default=None, help=f"comma-separated, of {', '.join(ENGINES)} (per shape)")
    add("--graphs", default=None, help=f"graphs edged runs on, of {', '.join(GRAPHS)} (per shape)")
    add(
        "--rounds",
        type=int,
        default=None,
        help="rounds: every row once per round, in turn, each in a fresh process (3; --quick: 1)",
    )
    add("--repeats", type=int, default=1, help="runs per row within its process, each round (1)")
    add("--context", type=int, default=1024, help="KV capacity in tokens of every engine (1024)")
    add("--idle-wait", type=float, default=300.0, help="seconds to wait for an idle machine (300)")
    add("--retries", type=int, default=2, help="re-runs of a disturbed measurement (2)")
    add(
        "--spec-dialogues",
        type=int,
        default=30,
        help="speculative workload's dialogues (30; 0 = off)",
    )
    add(
        "--all-logits",
        action="store_true",
        help="export graphs with logits for every position (default: last position only)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shape = "quick"
    args.shape = args.shape or "qwen3-0.6b"
    if args.rounds is None:
        args.rounds = 1 if args.shape == "quick" else 3
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds = {args.rounds} and --repeats = {args.repeats} must be >= 1")
    return parser, args


def _plan(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[int], list[str], list[tuple[str, str]], list[str]]:
    """(thread counts, engines, the (engine, graph) rows, the ONNX graphs to build) from the
    flags and the shape's defaults."""
    default_engines, default_graphs = SHAPE_DEFAULTS.get(args.shape, (ENGINES, tuple(GRAPHS)))
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    engines = [e.strip() for e in (args.engines or ",".join(default_engines)).split(",")]
    graphs = [g.strip() for g in (args.graphs or ",".join(default_graphs)).split(",")]
    engines, graphs = [e for e in engines if e], [g for g in graphs if g]
    bad = [e for e in engines if e not in ENGINES] + [g for g in graphs if g not in GRAPHS]
    if bad or not threads or min(threads) < 1:
        parser.error(f"--engines/--graphs/--threads: unknown or invalid {bad or args.threads}")
    if args.context < PROMPT_TOKENS + NEW_TOKENS:
        parser.error(f"--context = {args.context} is below {PROMPT_TOKENS + NEW_TOKENS}")
    plan = [
        (engine, graph)
        for engine in engines
        for graph in (graphs if engine == "edged" else ENGINE_GRAPHS[engine])
    ]
    onnx = [g for g in dict.fromkeys(g for _, g in plan) if g in GRAPHS]
    return threads, engines, plan, onnx


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse_args(argv)
    if args.worker:
        return worker_main()
    threads, engines, plan, onnx = _plan(parser, args)
    dirs, paths = prepare_models(
        args.shape, onnx, "llama.cpp" in engines, last_token_logits=not args.all_logits
    )
    chat = chat_prompt(dirs["checkpoint"])
    machine = machine_info()
    log("probing the memory bandwidth")
    probe = {"threads": max(threads), "thread_counts": threads, "mb": BANDWIDTH_MB}
    bandwidth = run_task("bandwidth", {**probe, "repeats": BANDWIDTH_REPEATS}, args.idle_wait)
    measured: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        if args.rounds > 1:
            log(f"round {r + 1} of {args.rounds}")
        for n in threads:
            for engine, graph in plan[r % len(plan) :] + plan[: r % len(plan)]:
                spec = row_spec(engine, graph, n, paths[graph], args, chat)
                spec["model_mb"] = model_bytes(paths[graph]) / 2**20
                measured.setdefault((n, engine, graph), []).append(measure_row(spec, args))
    results = [merge_rounds(measured[(n, e, g)]) for n in threads for e, g in plan]
    _check_same_tokens(results)
    for row in results:
        add_roofline(row, SHAPES[args.shape], bandwidth.get("gb_per_s", {}))
    speculative = run_speculative(args, paths, engines, max(threads))
    return report(
        args, machine, model_info(args.shape, paths, chat, args), bandwidth, results, speculative
    )


def report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    model: dict[str, Any],
    bandwidth: dict[str, Any],
    results: list[dict[str, Any]],
    speculative: dict[str, Any],
) -> int:
    """Print the tables and the ratios, write the JSON; the exit status."""
    import bench_spec

    summary = ratios(results)
    if speculative:
        summary.update(bench_spec.ratios(speculative))
    print(
        f"memory bandwidth ({bandwidth.get('method', '?')}), GB/s by threads: "
        f"{bandwidth.get('gb_per_s', bandwidth.get('error'))}"
    )
    print(table(results))
    chat = model["chat_prompt_tokens"]
    print(
        f"ttft cached: {SYSTEM_TOKENS} of {PROMPT_TOKENS} tokens cached; ttft chat: system "
        f"prompt ({chat['cached']} tokens) cached, vitals and question "
        f"({chat['total'] - chat['cached']} tokens) computed; roof: share of the bandwidth"
    )
    if speculative:
        print()
        print(bench_spec.table(speculative))
    print()
    print(json.dumps(summary, indent=2))
    if args.json:
        out = {
            "machine": machine,
            "model": model,
            "bandwidth": bandwidth,
            "results": results,
            "speculative": speculative,
            "ratios": summary,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.json}")
    failed = any("error" in r for r in results)
    failed = failed or any("error" in p for p in speculative.values() if isinstance(p, dict))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
