"""llama.cpp in the engine benchmark (tools/bench_engine.py): GGUF files of the benchmark's
checkpoint, and the workers that measure them through llama-cpp-python.

Files (the driver, in the project's environment): the checkpoint goes to an F16 GGUF once by
tools/make_gguf.py, then to Q4_0 and Q4_K_M by llama.cpp's own quantizer
(`llama_model_quantize`, run in the llama.cpp virtualenv), cached beside the other exports.

Workers run under the llama.cpp virtualenv's python (`~/.cache/edged/venv-llama`, which
tools/quality_table.py's `llama_python()` builds from the sdist on first use): this module
imports nothing from edged, and nothing outside the standard library at module level. They are
fed token ids, never text, and decode greedily by the argmax of the logits, so EOS never stops
a run early and every engine decodes the same number of tokens.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_worker import medians, rss_mb

LLAMA_TYPES = ("Q4_0", "Q4_K_M")
LOOKUP_DRAFTS = (2, 10)
"""`num_pred_tokens` of llama-cpp-python's prompt lookup: its default (10, "generally good for
GPU") and its advice for CPU-only machines (2)."""

# --------------------------------------------------------------------------------------------
# Files: run in the project's environment (make_gguf needs the gguf package and edged).
# --------------------------------------------------------------------------------------------


def prepare_ggufs(
    checkpoint: Path,
    folder: Path,
    types: Sequence[str] = LLAMA_TYPES,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """{type: GGUF path} for `types`, made once: F16 by tools/make_gguf.py, then each type by
    llama.cpp's quantizer from it."""
    import make_gguf  # sibling scripts: the tools directory is on sys.path
    import quality_table

    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / "model-F16.gguf"
    if not f16.is_file():
        log(f"converting {checkpoint} to {f16} (tools/make_gguf.py)")
        partial = f16.with_name(f16.name + ".partial")
        make_gguf.write_gguf(checkpoint, partial, "F16")
        partial.rename(f16)
    python = str(quality_table.llama_python())
    out = {}
    for name in types:
        path = folder / f"model-{name}.gguf"
        if not path.is_file():
            log(f"quantizing {path.name} with llama.cpp's quantizer")
            partial = path.with_name(path.name + ".partial")
            ftype = str(make_gguf.file_type(name))
            cmd = [python, str(Path(__file__).resolve()), "--quantize", str(f16), str(partial)]
            done = subprocess.run([*cmd, ftype], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"llama_model_quantize {name} failed:\n{done.stderr[-2000:]}")
            partial.rename(path)
        out[name] = path
    return out


def _quantize(source: str, out: str, ftype: int) -> int:  # in the llama.cpp virtualenv
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    return int(llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)))


# --------------------------------------------------------------------------------------------
# Workers: in the llama.cpp virtualenv.
# --------------------------------------------------------------------------------------------


def load_llama(spec: dict[str, Any], **kwargs: Any) -> Any:
    """A llama.cpp model with the row's threads and context.

    `spec["extra_bufts"]` False turns llama.cpp's extra buffer types off (weight repacking for
    its fast Q4_0 kernels, and the AMX matmul), which is what tools/quality_table.py does: the
    AMX path crashed in decode on the demo model's shapes on a Sapphire Rapids VM. Flash
    attention is on, as llama.cpp's own default (`auto`) sets it on a CPU; llama-cpp-python's
    default is off.
    """
    import llama_cpp

    lib = llama_cpp.llama_cpp  # the module Llama() reads its defaults from
    defaults = lib.llama_model_default_params

    def model_params() -> Any:
        params = defaults()
        params.use_extra_bufts = bool(spec.get("extra_bufts", True))
        return params

    lib.llama_model_default_params = model_params
    try:
        return llama_cpp.Llama(
            spec["model_dir"],
            n_ctx=spec["context"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            flash_attn=True,
            verbose=False,
            **kwargs,
        )
    finally:
        lib.llama_model_default_params = defaults


def _omp_wait_policy() -> str:
    """llama.cpp's threads are an OpenMP team, spinning at barriers by default: fastest on an
    idle machine, but when another process holds one of the cores a step can stall for
    hundreds of ms (0.45 s a token measured here, 2 threads). OMP_WAIT_POLICY=PASSIVE in the
    environment makes them sleep instead; the rows record which was in force."""
    import os

    return os.environ.get("OMP_WAIT_POLICY", "default (spin)")


def _argmax(llm: Any) -> int:
    import llama_cpp
    import numpy as np

    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())


def _generate(
    llm: Any, ids: list[int], new: int, keep: int = 0
) -> tuple[float, float, float, float, list[int]]:
    """Greedy decoding of `new` tokens after `ids`, reusing the cache's first `keep` positions
    (a prefix every run shares); (start, prefilled, first token, last token, tokens)."""
    llm.n_tokens = keep  # eval() drops every cached position from here on
    start = time.perf_counter()
    llm.eval(ids[keep:])
    prefilled = time.perf_counter()
    tokens: list[int] = []
    first = 0.0
    for i in range(new):
        tokens.append(_argmax(llm))
        if i == 0:
            first = time.perf_counter()
        if i < new - 1:
            llm.eval([tokens[-1]])
    return start, prefilled, first, time.perf_counter(), tokens


def _first_token_ms(llm: Any, ids: list[int], keep: int, repeats: int) -> float:
    """Median time to the first token with the cache's first `keep` positions reused."""
    import statistics

    _generate(llm, ids, 1)  # the cache now holds ids, whose prefix later runs keep
    times = []
    for _ in range(repeats):
        start, _, first, _, _ = _generate(llm, ids, 1, keep)
        times.append((first - start) * 1000)
    return statistics.median(times)


def run_llama(spec: dict[str, Any]) -> dict[str, Any]:
    """One row: prefill, decode, time to first token (cold, with the 200-token prefix cached,
    and the chat prompt with its system turn cached), load time and memory."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = load_llama(spec)
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "rss_after_load_mb": rss_mb()}
    out["layout"] = {
        "extra_bufts": bool(spec.get("extra_bufts", True)),
        "flash_attn": True,
        "kv_type": "f16",
        "omp_wait_policy": _omp_wait_policy(),
        "n_ctx": llm.n_ctx(),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
    }
    if spec.get("memory_only"):  # a short step through every kernel, no measurement
        _generate(llm, spec["prompt"][:16], 2)
        return out
    prompt: list[int] = spec["prompt"]
    new = spec["new_tokens"]
    _generate(llm, prompt[:16], 4)
    runs = []
    for _ in range(spec["repeats"]):
        start, prefilled, first, last, tokens = _generate(llm, prompt, new)
        runs.append(
            {
                "prefill_tps": len(prompt) / (prefilled - start),
                "decode_tps": (new - 1) / (last - first),
                "ttft_ms": (first - start) * 1000,
            }
        )
    out.update(medians(runs), tokens=tokens)
    out["ttft_cached_ms"] = _first_token_ms(llm, prompt, spec["system_tokens"], spec["repeats"])
    chat = spec["chat"]
    keep = len(chat["system_ids"])
    out["ttft_chat_ms"] = _first_token_ms(llm, chat["ids"], keep, spec["repeats"])
    return out


def _answer(llm: Any, prompt: list[int], max_new: int, eos: set[int]) -> tuple[list[int], float]:
    """A greedy answer through llama-cpp-python's generate() (with its draft model, if the
    Llama has one), up to EOS or `max_new` tokens; (tokens, seconds after the first token)."""
    tokens: list[int] = []
    first = last = 0.0
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        last = time.perf_counter()
        if not tokens:
            first = last
        tokens.append(int(token))
        if token in eos or len(tokens) >= max_new:
            break
    return tokens, last - first


@dataclass
class _Tally:
    """One setting's answers, summed over the prompts."""

    tokens: int = 0
    decode_s: float = 0.0
    same_tokens: int = 0
    """Answers with the same tokens as plain decoding's."""

    def add(self, tokens: list[int], seconds: float, plain: list[int]) -> None:
        self.tokens += len(tokens) - 1
        self.decode_s += seconds
        self.same_tokens += int(tokens == plain)

    @property
    def decode_tps(self) -> float | None:
        return self.tokens / self.decode_s if self.decode_s else None

    def row(self, plain_tps: float | None) -> dict[str, Any]:
        tps = self.decode_tps
        speedup = tps / plain_tps if plain_tps and tps else None
        return {**asdict(self), "decode_tps": tps, "speedup": speedup}


def run_lookup(spec: dict[str, Any]) -> dict[str, Any]:
    """The speculative workload's llama.cpp side: the demo model's GGUF on the same prompts,
    decoded plainly and with llama-cpp-python's prompt lookup (`LlamaPromptLookupDecoding`)."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    models = {"plain": load_llama(spec)}
    for k in spec.get("lookup_drafts", LOOKUP_DRAFTS):
        models[f"lookup {k}"] = load_llama(
            spec, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k)
        )
    eos, max_new = set(spec["eos"]), spec["max_new_tokens"]
    tally = {name: _Tally() for name in models}
    for prompt in spec["prompts"]:
        answers = {name: _answer(llm, prompt, max_new, eos) for name, llm in models.items()}
        for name, (tokens, seconds) in answers.items():
            tally[name].add(tokens, seconds, plain=answers["plain"][0])
    plain = tally["plain"].decode_tps
    settings = {name: t.row(plain) for name, t in tally.items()}
    return {
        "prompts": len(spec["prompts"]),
        "extra_bufts": bool(spec.get("extra_bufts", True)),
        "omp_wait_policy": _omp_wait_policy(),
        "settings": settings,
    }


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "--quantize":
        return _quantize(argv[1], argv[2], int(argv[3]))
    print("usage: bench_llama.py --quantize F16.gguf OUT.gguf FTYPE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
