"""Startup memory check: refuse a model that cannot fit, before loading it.

An OOM kill halfway through loading a model on a Pi tells the operator nothing; this check
says how much the model needs, how much the node may use, and what to change.

The estimate, measured with onnxruntime 1.32 on int4 MatMulNBits graphs (tools/bench_engine.py,
Qwen3-0.6B shape): onnxruntime prepacks int4 weights for its accuracy-level-4 kernels into a
copy about 1.75x the size of the files, plus the preallocated KV cache, plus ~150 MB of
Python, onnxruntime and tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edged.governor.sensors import Readings

PREPACK_FACTOR = 1.75
RUNTIME_MB = 150.0


class ModelDoesNotFit(Exception):
    """The model and its KV cache need more memory than this node may use."""


@dataclass(frozen=True)
class MemoryNeed:
    files_mb: float
    kv_mb: float

    @property
    def total_mb(self) -> float:
        return self.files_mb * PREPACK_FACTOR + self.kv_mb + RUNTIME_MB


def kv_bytes_per_token(model_dir: Path) -> int:
    """From config.json: layers x (key + value) x KV heads x head size x 4 bytes (fp32 KV)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        return int(cfg["num_hidden_layers"]) * 2 * heads * head_dim * 4
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 0  # unknown: the check then rests on the weights alone


def memory_need(model_dir: Path, context_length: int) -> MemoryNeed:
    files = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    return MemoryNeed(files / 2**20, kv_bytes_per_token(model_dir) * context_length / 2**20)


def check_model_fits(model_dir: Path, context_length: int, readings: Readings) -> MemoryNeed:
    """Raise ModelDoesNotFit, with the numbers, when the model cannot fit; else the need."""
    need = memory_need(model_dir, context_length)
    limits = []
    if readings.cgroup_limit_mb is not None:
        usage = readings.cgroup_usage_mb or 0.0
        limits.append(
            (
                readings.cgroup_limit_mb - usage,
                f"cgroup limit {readings.cgroup_limit_mb:.0f} MB, {usage:.0f} MB in use",
            )
        )
    if readings.mem_available_mb is not None:
        limits.append(
            (readings.mem_available_mb, f"MemAvailable {readings.mem_available_mb:.0f} MB")
        )
    if not limits:
        return need
    available, why = min(limits)
    if need.total_mb > available:
        raise ModelDoesNotFit(
            f"{model_dir}: the model needs about {need.total_mb:.0f} MB "
            f"({need.files_mb:.0f} MB of files x {PREPACK_FACTOR} for onnxruntime's prepacked "
            f"int4 weights, {need.kv_mb:.0f} MB of KV cache for context_length = "
            f"{context_length}, {RUNTIME_MB:.0f} MB runtime) but this node may use "
            f"{available:.0f} MB ({why}): export a smaller model or quantization, lower "
            "model.context_length, or raise the service's MemoryMax"
        )
    return need
