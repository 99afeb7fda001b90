"""What an exported causal-LM graph looks like, read from the onnxruntime session by name.

Two layouts exist in the wild and the engine runs both:

* **optimum** (`text-generation-with-past`): inputs `input_ids`, `attention_mask`,
  `position_ids`, `past_key_values.N.key/value` of shape (batch, kv_heads, past_len, head_dim);
  outputs `logits` and `present.N.key/value` one position longer. Every step allocates new
  present tensors, because the graph concatenates.
* **GroupQueryAttention** (onnxruntime-genai's model builder): no `position_ids` (rotary
  positions come from the mask inside the op), and past and present may be *one* buffer of
  shape (batch, kv_heads, max_len, head_dim) that the op appends to in place. This is what
  makes onnxruntime-genai's decode fast, and the engine drives it the same way.

Present outputs are matched to past inputs by name, never by position, because exporters do
not promise an order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.engine.manifest import ModelDirError, ModelManifest

LOGITS_KEEP = "logits_to_keep"
"""The graph input (int64 [1], default 1) naming how many last positions get logits."""
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class GraphLayout:
    kind: str
    """`optimum` or `gqa`."""
    num_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: type
    ids_dtype: type
    mask_dtype: type
    has_position_ids: bool
    shared_kv_buffer: bool
    """Past and present are the same preallocated buffer, appended in place by the graph."""
    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    """present_names[i] is the output that continues past_names[i]."""
    logits_name: str
    logits_last_only: bool
    logits_keep_input: str | None = None
    """The input that sets how many last positions get logits (`logits_to_keep`, 1 unless
    fed), when the graph has it: a verification pass of speculative decoding asks for more."""

    def describe(self) -> dict[str, object]:
        return {
            "layout": self.kind,
            "layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "kv_dtype": np.dtype(self.kv_dtype).name,
            "position_ids": self.has_position_ids,
            "shared_kv_buffer": self.shared_kv_buffer,
            "logits": "last_n"
            if self.logits_keep_input
            else ("last" if self.logits_last_only else "all"),
        }

    def kv_bytes_per_token(self) -> int:
        per_layer = 2 * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize
        return self.num_layers * per_layer


def _dtype(type_str: str, name: str) -> type:
    try:
        return _ORT_DTYPES[type_str]
    except KeyError:
        raise ModelDirError(f"graph input {name!r} has unsupported type {type_str}") from None


def _genai_config(model_dir: Path) -> dict[str, Any]:
    cfg = model_dir / "genai_config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
        return {**data.get("model", {}), "search": data.get("search", {})}
    except (OSError, json.JSONDecodeError, AttributeError, TypeError):
        return {}


def _genai_decoder(model_dir: Path) -> dict[str, Any]:
    decoder = _genai_config(model_dir).get("decoder", {})
    return decoder if isinstance(decoder, dict) else {}


def inspect_graph(
    session: ort.InferenceSession, manifest: ModelManifest, model_dir: Path
) -> GraphLayout:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    _require_io(inputs, outputs, manifest.graph_file)
    past_names, present_names = _kv_names(inputs, outputs, manifest.graph_file)
    first = inputs[past_names[0]]
    kv_heads, head_dim = _kv_shape(first, _genai_decoder(model_dir), manifest.graph_file)
    gqa = manifest.exporter in ("ort-genai", "stream") or "position_ids" not in inputs
    shares = _genai_config(model_dir).get("search", {}).get("past_present_share_buffer")
    logits_shape = outputs["logits"].shape
    return GraphLayout(
        kind="gqa" if gqa else "optimum",
        num_layers=len(past_names) // 2,
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_dtype=_dtype(first.type, first.name),
        ids_dtype=_dtype(inputs["input_ids"].type, "input_ids"),
        mask_dtype=_dtype(inputs["attention_mask"].type, "attention_mask"),
        has_position_ids="position_ids" in inputs,
        # GroupQueryAttention appends in place when past and present are the same buffer; the
        # optimum graph concatenates, so it can never share.
        shared_kv_buffer=gqa and (bool(shares) if shares is not None else True),
        past_names=past_names,
        present_names=present_names,
        logits_name="logits",
        logits_last_only=manifest.logits in ("last", "last_n")
        or (len(logits_shape) == 3 and logits_shape[1] == 1),
        logits_keep_input=LOGITS_KEEP if LOGITS_KEEP in _overridable(session) else None,
    )


def _overridable(session: ort.InferenceSession) -> set[str]:
    """Inputs with a default (initializers a run may override)."""
    return {i.name for i in session.get_overridable_initializers()} | {
        i.name for i in session.get_inputs()
    }


def _require_io(inputs: dict[str, Any], outputs: dict[str, Any], graph_file: str) -> None:
    for required in ("input_ids", "attention_mask"):
        if required not in inputs:
            raise ModelDirError(
                f"{graph_file}: graph has no {required!r} input "
                f"(inputs: {sorted(inputs)}); is this a causal LM exported with past?"
            )
    if "logits" not in outputs:
        raise ModelDirError(f"{graph_file}: graph has no 'logits' output")


def _kv_names(
    inputs: dict[str, Any], outputs: dict[str, Any], graph_file: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(past input names, present output names), layer by layer, key before value."""
    layers: dict[int, dict[str, str]] = {}
    for name in inputs:
        match = _PAST.match(name)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = name
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ModelDirError(
            f"{graph_file}: past_key_values.N.key/value inputs missing or not numbered "
            "0..N-1; export with task text-generation-with-past"
        )
    past_names: list[str] = []
    present_names: list[str] = []
    for layer in range(len(layers)):
        for part in ("key", "value"):
            past = layers[layer].get(part)
            present = f"present.{layer}.{part}"
            if past is None or present not in outputs:
                raise ModelDirError(
                    f"{graph_file}: layer {layer} lacks past_key_values.{layer}.{part} "
                    f"or its output {present}"
                )
            past_names.append(past)
            present_names.append(present)
    return tuple(past_names), tuple(present_names)


def _kv_shape(first: Any, genai: dict[str, Any], graph_file: str) -> tuple[int, int]:
    kv_heads, head_dim = first.shape[1], first.shape[3]
    # The stock onnxruntime-genai builder leaves these symbolic; its config has them.
    if not isinstance(kv_heads, int):
        kv_heads = genai.get("num_key_value_heads")
    if not isinstance(head_dim, int):
        head_dim = genai.get("head_size")
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ModelDirError(
            f"{graph_file}: {first.name} shape {first.shape} needs fixed kv_heads and "
            "head_dim (dimensions 1 and 3)"
        )
    return kv_heads, head_dim
