#!/usr/bin/env python3
"""What quantization costs, on one model and one held-out set, every row measured in one run
(issue #12): edged's exports (fp32, int8, and each int4 algorithm) against llama.cpp's Q8_0,
Q4_0 and Q4_K_M made from the same checkpoint and scored on the same token ids, plus the
round trip a clinic makes with a downloaded GGUF (Q4_K_M -> edged int4).

    python tools/quality_table.py                     # the demo model, its bundled eval set
    python tools/quality_table.py --checkpoint DIR --data held.jsonl --json quality.json

Scores: perplexity of the assistant turns of the held-out dialogues given their prompts, and
multiple-choice accuracy (each option scored by its log-likelihood), both teacher-forced; for
edged rows also the top-1 agreement and mean KL of next-token distributions against edged's
fp32 export. Sizes are the model files (graph and weights, not the tokenizer).

llama.cpp runs through llama-cpp-python, built from its sdist in a virtualenv of its own
(`~/.cache/edged/venv-llama`, created on first use, ~10 minutes on 2 cores): the Q4_K_M file is
made by llama.cpp's own quantizer from an F16 GGUF that tools/make_gguf.py writes. The imatrix
rows need llama.cpp's `llama-imatrix` and `llama-quantize` tools (llama-cpp-python ships
neither; build them from the same sdist: `cmake -B build && cmake --build build --target
llama-imatrix llama-quantize`) on $PATH or in $EDGED_LLAMA_BIN; without them those rows are left
out and the table says so. GPTQ and the imatrix are calibrated on the bundled training sample
(edged/eval/data/calibration.jsonl), never on the text they are scored on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = REPO / "tests" / "fixtures" / "demo-clinical-hf"
LLAMA_VENV = Path(os.environ.get("EDGED_LLAMA_VENV", Path.home() / ".cache/edged/venv-llama"))
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
EDGED_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("edged fp32", {"quant": "fp32"}),
    ("edged int8", {"quant": "int8"}),
    # The stream exporter (one matrix for the tied embedding and LM head): all int4 in blocks of
    # 32; the LM head at 8 bits (llama.cpp keeps it at Q6_K); and that with blocks of 64.
    ("edged int4 rtn, stream", {"exporter": "stream", "lm_head_bits": 4, "block_size": 32}),
    ("edged int4, 8-bit LM head", {"exporter": "stream", "lm_head_bits": 8, "block_size": 32}),
    (
        "edged int4, 8-bit LM head, block 64",
        {"exporter": "stream", "lm_head_bits": 8, "block_size": 64},
    ),
    ("edged int4 rtn, optimum", {"quant": "int4", "exporter": "optimum"}),
    ("edged int4 rtn asymmetric", {"quant": "int4", "int4_algorithm": "rtn-asym"}),
    ("edged int4 hqq", {"quant": "int4", "int4_algorithm": "hqq"}),
    ("edged int4 k-quant search", {"quant": "int4", "int4_algorithm": "kquant"}),
    ("edged int4 gptq", {"quant": "int4", "int4_algorithm": "gptq"}),
)


def _label(name: str, options: dict[str, Any]) -> str:
    """The row's name, marked when its options are what `edged model export` does by default."""
    from edged.export.options import STREAM_BLOCK_SIZE, STREAM_LM_HEAD_BITS

    default = {"exporter": "stream", "lm_head_bits": STREAM_LM_HEAD_BITS}
    default["block_size"] = STREAM_BLOCK_SIZE
    return f"{name} (default)" if options == default else name


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))


def export(checkpoint: Path, out: Path, calibration: Path, **options: Any) -> Path:
    from edged.export import ExportOptions, export_model

    if not (out / "edged-model.json").is_file():
        export_model(
            ExportOptions(
                source=str(checkpoint),
                output=out,
                overwrite=True,
                progress=False,
                calibration=calibration,
                **options,
            )
        )
    return out


def edged_scores(model: Path, reference: Path | None, data: Path) -> dict[str, Any]:
    from edged.engine import Engine, EngineOptions
    from edged.eval.datasets import load
    from edged.eval.harness import EvalOptions, report
    from edged.eval.harness import evaluate as run_eval

    options = EngineOptions(threads=0, context_length=2048)
    engine = Engine.load(model, options)
    ref = Engine.load(reference, options) if reference else None
    rows = load([data, data.with_name("mcq.jsonl")])
    tally = run_eval(engine, rows, ref, EvalOptions(generate=False))
    r = report(engine, tally, [data], ref, 0.0)
    return {
        "perplexity": r["perplexity"]["value"],
        "tokens": r["perplexity"]["tokens"],
        "mcq_accuracy": r["mcq"]["accuracy"],
        "top1_vs_fp32": r["agreement"]["top1"],
        "kl_vs_fp32": r["agreement"]["mean_kl"],
        "model_mb": round(model_bytes(model) / 2**20, 3),
    }


def token_spec(fp32: Path, data: Path, reference: Path) -> dict[str, Any]:
    """The exact token ids edged scores, for llama.cpp to score the same ones; and the fp32
    export's logits at every scored position, saved to `reference` (.npy) so llama.cpp's rows
    get the same agreement and KL columns as edged's."""
    import numpy as np

    from edged.engine import Engine, EngineOptions
    from edged.eval.datasets import load
    from edged.eval.harness import mcq_tokens, split_chat

    engine = Engine.load(fp32, EngineOptions(threads=0, context_length=2048))
    sequences, items, logits = [], [], []
    for row in load([data, data.with_name("mcq.jsonl")]):
        if row.kind == "dialogue":
            prompt, target = split_chat(engine, row.data["messages"])
            sequences.append({"prompt": prompt, "target": target})
            logits.append(engine.logits_for(prompt, [target])[0])
        elif row.kind == "mcq":
            prompt, options, right = mcq_tokens(engine, row.data)
            items.append({"prompt": prompt, "options": options, "answer": right})
    np.save(reference, np.concatenate(logits).astype(np.float32))
    return {"sequences": sequences, "mcq": items, "reference": str(reference)}


# -- llama.cpp, in its own virtualenv -----------------------------------------------------


def llama_python() -> Path:
    python = LLAMA_VENV / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"building {LLAMA_CPP_PYTHON} in {LLAMA_VENV} (about 10 minutes)", file=sys.stderr)
    venv.create(LLAMA_VENV, with_pip=True, clear=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", LLAMA_CPP_PYTHON, "numpy"],
        check=True,
        env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
    )
    return python


def llama_tool(name: str) -> str | None:
    """A llama.cpp command-line tool (`llama-imatrix`, `llama-quantize`) from
    $EDGED_LLAMA_BIN or $PATH, or None: llama-cpp-python ships neither."""
    import shutil

    folder = os.environ.get("EDGED_LLAMA_BIN")
    found = Path(folder) / name if folder else None
    if found is not None and found.is_file():
        return str(found)
    return shutil.which(name)


def imatrix_ggufs(checkpoint: Path, f16: Path, work: Path, calibration: Path) -> dict[str, Path]:
    """Q4_0 and Q4_K_M quantized with an importance matrix that llama.cpp's llama-imatrix
    computes on the calibration dialogues (rendered by the model's chat template), as
    llama.cpp's published 4-bit files are made; {} without the two tools."""
    imatrix, quantize = llama_tool("llama-imatrix"), llama_tool("llama-quantize")
    if imatrix is None or quantize is None:
        print("no llama-imatrix/llama-quantize: no imatrix rows", file=sys.stderr)
        return {}
    from transformers import AutoTokenizer

    from edged.export.calibration import calibration_texts

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = work / "calibration.txt"
    text.write_text("\n".join(calibration_texts(calibration, tokenizer, limit=10_000)))
    matrix = work / "imatrix.gguf"
    _run([imatrix, "-m", str(f16), "-f", str(text), "-o", str(matrix), "-c", "512", "-t", "2"])
    out = {}
    for name in ("Q4_0", "Q4_K_M"):
        path = work / f"model-{name}-imatrix.gguf"
        _run([quantize, "--imatrix", str(matrix), str(f16), str(path), name])
        out[f"{name} imatrix"] = path
    return out


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{Path(command[0]).name} failed:\n{done.stderr[-3000:]}")


def llama_rows(
    checkpoint: Path, work: Path, spec_path: Path, calibration: Path
) -> dict[str, dict[str, Any]]:
    import make_gguf

    f16 = make_gguf.write_gguf(checkpoint, work / "model-f16.gguf", "F16")
    models: dict[str, dict[str, Any]] = {
        name: {"path": str(work / f"model-{name}.gguf"), "ftype": make_gguf.file_type(name)}
        for name in LLAMA_TYPES
    }
    for name, path in imatrix_ggufs(checkpoint, f16, work, calibration).items():
        models[name] = {"path": str(path), "ftype": None}
    job = {"f16": str(f16), "models": models, "spec": str(spec_path)}
    out = subprocess.run(
        [str(llama_python()), str(Path(__file__).resolve()), "--llama-worker", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _log_softmax(scores: Any) -> Any:
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    scores = scores - scores.max(axis=1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))


def _next_token_logprobs(llm: Any, prompt: list[int], target: list[int]) -> Any:
    """llama.cpp's log-distributions over the next token at each target position after the
    prompt (teacher-forced), shape (len(target), vocab)."""
    llm.reset()
    llm.eval(prompt + target[:-1])
    first = len(prompt) - 1
    return _log_softmax(llm.scores[first : first + len(target)])


def _logprobs(llm: Any, prompt: list[int], target: list[int]) -> Any:
    """Log-probabilities llama.cpp gives each target token after the prompt."""
    import numpy as np

    return _next_token_logprobs(llm, prompt, target)[np.arange(len(target)), target]


def _load_llama(llama_cpp: Any, path: Path) -> Any:
    """A llama.cpp model on its plain CPU kernels.

    Extra buffer types (weight repacking, and the AMX matmul on CPUs that have AMX) are turned
    off: the AMX path crashes in decode with this small model's shapes (SIGSEGV in
    ggml_backend_amx_mul_mat, seen here on a Sapphire Rapids VM), and the plain AVX kernels
    compute the same quantized dot products, so the scores are llama.cpp's either way.
    """
    lib = llama_cpp.llama_cpp  # the module Llama() reads its defaults from
    defaults = lib.llama_model_default_params

    def plain_cpu_params() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = plain_cpu_params
    try:
        return llama_cpp.Llama(
            str(path), n_ctx=2048, logits_all=True, verbose=False, n_threads=os.cpu_count()
        )
    finally:
        lib.llama_model_default_params = defaults


def _llama_worker(job: dict[str, Any]) -> None:  # runs in the llama.cpp venv: no edged here
    import ctypes

    import llama_cpp
    import numpy as np

    spec = json.loads(Path(job["spec"]).read_text())
    results = {}
    for name, model in job["models"].items():
        path = Path(model["path"])
        if model["ftype"] is not None:  # quantized here by llama.cpp's library
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = model["ftype"]
            rc = llama_cpp.llama_model_quantize(
                job["f16"].encode(), str(path).encode(), ctypes.byref(params)
            )
            if rc != 0:
                raise SystemExit(f"llama_model_quantize {name} failed: {rc}")
        llm = _load_llama(llama_cpp, path)

        reference = np.load(spec["reference"], mmap_mode="r")
        nll = kl = 0.0
        tokens = agree = 0
        for seq in spec["sequences"]:
            target = seq["target"]
            lp = _next_token_logprobs(llm, seq["prompt"], target)
            ref = _log_softmax(reference[tokens : tokens + len(target)])
            nll -= float(lp[np.arange(len(target)), target].sum())
            agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            kl += float((np.exp(ref) * (ref - lp)).sum())
            tokens += len(target)
        right = sum(
            int(
                np.argmax([_logprobs(llm, m["prompt"], o).sum() for o in m["options"]])
                == m["answer"]
            )
            for m in spec["mcq"]
        )
        results[f"llama.cpp {name}"] = {
            "perplexity": round(float(np.exp(nll / tokens)), 4),
            "tokens": tokens,
            "mcq_accuracy": round(right / len(spec["mcq"]), 4),
            "top1_vs_fp32": round(agree / tokens, 4),
            "kl_vs_fp32": round(kl / tokens, 6),
            "model_mb": round(path.stat().st_size / 2**20, 3),
            "gguf": str(path),
        }
    print(json.dumps(results))


# -- the table ------------------------------------------------------------------------------


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return format(value, fmt) if value is not None else "–"


def render(rows: dict[str, dict[str, Any]]) -> str:
    head = f"{'':34} {'perplexity':>10} {'MCQ acc':>8} {'top-1 vs fp32':>13} {'KL':>9} {'MB':>7}"
    lines = [head]
    for name, r in rows.items():
        lines.append(
            f"{name:34} {_cell(r, 'perplexity', '10.4f')} {_cell(r, 'mcq_accuracy', '8.3f')} "
            f"{_cell(r, 'top1_vs_fp32', '13.4f')} {_cell(r, 'kl_vs_fp32', '9.5f')} "
            f"{_cell(r, 'model_mb', '7.2f')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    ap.add_argument("--data", type=Path, default=None, help="held-out dialogues (mcq.jsonl beside)")
    ap.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="dialogues to calibrate GPTQ and the imatrix on (default: the bundled training "
        "sample, never the scored text)",
    )
    ap.add_argument("--work", type=Path, default=None, help="keep the exports here")
    ap.add_argument("--skip-llama", action="store_true", help="edged rows only")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--llama-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.llama_worker:
        _llama_worker(json.loads(args.llama_worker))
        return 0
    from edged.eval.datasets import DATA_DIR, DEFAULT_FILES

    data = args.data or DEFAULT_FILES[0]
    calibration = args.calibration or DATA_DIR / "calibration.jsonl"
    work = args.work or Path(tempfile.mkdtemp(prefix="edged-quality-"))
    rows: dict[str, dict[str, Any]] = {}
    fp32 = export(args.checkpoint, work / "fp32", calibration, quant="fp32")
    for name, options in EDGED_ROWS:
        slug = name.replace(" ", "-").replace(",", "")
        model = export(args.checkpoint, work / slug, calibration, **options)
        name = _label(name, options)
        rows[name] = edged_scores(model, fp32, data)
        print(f"{name}: {rows[name]}", file=sys.stderr)
    if not args.skip_llama:
        spec = work / "tokens.json"
        spec.write_text(json.dumps(token_spec(fp32, data, work / "fp32-logits.npy")))
        llama = llama_rows(args.checkpoint, work, spec, calibration)
        rows.update(llama)
        q4km = Path(llama["llama.cpp Q4_K_M"]["gguf"])
        model = export(q4km, work / "q4km-to-edged-int4", calibration, quant="int4")
        rows["GGUF Q4_K_M -> edged (default export)"] = edged_scores(model, fp32, data)
    print(render(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"checkpoint": str(args.checkpoint), "data": str(data), "rows": rows}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
