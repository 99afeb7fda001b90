"""Calibration feeds for GPTQ: real prompts run through the fp32 graph, so the quantizer sees
the activations the model meets in service (edged's own dialogues, rendered by the model's chat
template)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .options import ExportError

SAMPLES = 32
"""Prompts fed to the quantizer: GPTQ's Hessians settle within a few dozen sequences."""
MAX_TOKENS = 384


def calibration_texts(path: Path, tokenizer: Any, limit: int = SAMPLES) -> list[str]:
    """The first `limit` rows of a JSONL file as text: a dialogue rendered by the chat
    template, or a {"text"} row as it is."""
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ExportError(f"calibration = {path}: cannot read: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if len(texts) == limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ExportError(f"{path}:{number}: calibration row is not JSON") from None
        if isinstance(row, dict) and "messages" in row:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        else:
            raise ExportError(f"{path}:{number}: calibration rows need messages or text")
    if not texts:
        raise ExportError(f"calibration = {path}: no rows")
    return texts


class CalibrationTexts:
    """An onnxruntime CalibrationDataReader over prompts for the exported fp32 graph: a prefill
    of each text with an empty KV cache, every input the graph declares filled in."""

    def __init__(self, graph: Path, tokenizer: Any, path: Path | None) -> None:
        import onnx

        if path is None:
            raise ExportError("gptq needs calibration data")
        model = onnx.load(str(graph), load_external_data=False)
        self._inputs = {i.name: i for i in model.graph.input}
        self._texts = calibration_texts(path, tokenizer)
        self._tokenizer = tokenizer
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _feed(self, text: str) -> dict[str, np.ndarray]:
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
        n = len(ids)
        feed = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
        }
        if "position_ids" in self._inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None, :]
        for name, value in self._inputs.items():
            if name.startswith("past_key_values."):
                dims = value.type.tensor_type.shape.dim
                kv_heads, head_dim = dims[1].dim_value, dims[3].dim_value
                feed[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        return feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = (self._feed(t) for t in self._texts)
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        # The quantizer deep-copies the reader and iterates the copy.
        return (self._feed(t) for t in self._texts)
