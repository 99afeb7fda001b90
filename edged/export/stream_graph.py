"""edged's own exporter: the GroupQueryAttention graph, built tensor by tensor.

The optimum path traces an fp32 copy of the whole model into an fp32 ONNX graph and quantizes
that (peak ≈ 2.5 × the fp32 weights: 17 GB for Qwen3-1.7B); onnxruntime-genai's builder also
materialises the model. Here the graph is written directly: each weight is read from the
safetensors a band of rows at a time (`weights.CheckpointWeights`), quantized with
onnxruntime's own int4 kernel (`blocks`), appended to `model.onnx.data`, and dropped. The
peak is one band plus the largest finished int4 matrix (the embedding), whatever the model's
size.

The graph is the layout onnxruntime-genai's builder makes for Qwen3 (see genai_builder.py for
its inputs and outputs), so the engine runs it with one in-place KV buffer per layer:
fused QKV MatMulNBits, per-head RMSNorm of q and k, GroupQueryAttention with rotary inside,
SkipSimplifiedLayerNormalization for the residuals, SiLU-gated MLP, and one int4 matrix read
by both the LM head (MatMulNBits) and, for tied models, the embedding (GatherBlockQuantized).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .blocks import BLOCK_SIZE, BlockMatrix, blob_bytes, quantize_rows
from .options import ExportError
from .progress import bar
from .weights import CheckpointWeights

ACCURACY_LEVEL = 4
"""MatMulNBits accuracy level 4: activations quantized to int8, the fast path on ARM and x86."""
BAND_ROWS = 8192
"""Rows converted to float32 at a time: 64 MB for a 2,048-wide matrix."""
_ALIGN_LARGE = 65536
"""Tensors of 1 MB and more start on a 64 KB boundary (onnx's own rule), so onnxruntime can
memory-map them instead of copying them onto the heap."""
_MS = "com.microsoft"
LOGITS_KEEP = "logits_to_keep"
"""Input: how many of the last positions get logits (int64 [1], default 1). A speculative
decoder asks for the drafted positions' logits with it; prefill and plain steps leave it at 1."""
_INT64_MAX = np.iinfo(np.int64).max
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)


@dataclass(frozen=True)
class Qwen3Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path) -> Qwen3Shape:
        """The shape, or an ExportError naming the first setting this builder cannot honour."""
        unsupported = unsupported_setting(config)
        if unsupported:
            raise ExportError(f"{where}: {unsupported}; use exporter 'optimum'")
        heads = int(config["num_attention_heads"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            tied=bool(config.get("tie_word_embeddings", False)),
        )


def unsupported_setting(config: dict[str, Any]) -> str | None:
    """Why this builder cannot export the checkpoint `config` describes, or None if it can."""
    archs = config.get("architectures") or []
    checks = [
        (
            bool(archs) and archs[0] in SUPPORTED_ARCHITECTURES,
            f"architectures = {archs!r}; the stream exporter builds "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}",
        ),
        (config.get("hidden_act", "silu") == "silu", f"hidden_act = {config.get('hidden_act')!r}"),
        (_plain_rope(config.get("rope_scaling")), f"rope_scaling = {config.get('rope_scaling')!r}"),
        (not config.get("attention_bias"), "attention_bias = true"),
        (not config.get("use_sliding_window"), "use_sliding_window = true"),
    ]
    for ok, what in checks:
        if not ok:
            return what if what.startswith("architectures") else f"{what} is not supported"
    return None


def _plain_rope(scaling: Any) -> bool:
    """No rope scaling: absent, or transformers' explicit `{"rope_type": "default"}`."""
    if not scaling:
        return True
    return isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"


class GraphWriter:
    """Nodes and initializers of one graph; initializer data goes straight to the data file."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self._data = open(data_path, "wb")  # noqa: SIM115 - closed by save()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: set[str] = set()

    def weight(self, name: str, array: np.ndarray) -> str:
        raw = np.ascontiguousarray(array).tobytes()
        align = _ALIGN_LARGE if len(raw) >= 1 << 20 else 16
        offset = -(-self._data.tell() // align) * align
        self._data.write(b"\0" * (offset - self._data.tell()))
        self._data.write(raw)
        tensor = TensorProto(name=name, dims=list(array.shape))
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_path.name),
            ("offset", str(offset)),
            ("length", str(len(raw))),
        ):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def constant_input(self, name: str, value: np.ndarray) -> str:
        """A small initializer stored inside the graph (the default of an input named alike)."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def alias(self, name: str, of: str, dims: list[int]) -> str:
        """An initializer named `name` reading the same data-file bytes as `of`, shaped `dims`."""
        source = next(t for t in self.initializers if t.name == of)
        tensor = TensorProto(name=name, dims=dims, data_type=source.data_type)
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.extend(source.external_data)
        self.initializers.append(tensor)
        return name

    def ints(self, *values: int) -> str:
        """A 1-D int64 Constant (shapes, split sizes, axes), made once per distinct value."""
        return self._constant(f"/model/constants/INT64/{list(values)}", [len(values)], values)

    def scalar(self, value: int) -> str:
        """A 0-D int64 Constant (a Gather index that drops the axis)."""
        return self._constant(f"/model/constants/INT64/{value}", [], (value,))

    def _constant(self, name: str, dims: list[int], values: tuple[int, ...]) -> str:
        if name not in self._constants:
            tensor = helper.make_tensor(name, TensorProto.INT64, dims, list(values))
            self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
            self._constants.add(name)
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        name: str,
        outputs: int | Sequence[str] = 1,
        **attrs: Any,
    ) -> str:
        """Add `op` and return its first output. `outputs` is a count (named `name/output_i`)
        or the names themselves ("" for an optional output left unused)."""
        domain = _MS if op in _CONTRIB_OPS else None
        if isinstance(outputs, int):
            outs = [f"{name}/output_{i}" for i in range(outputs)]
        else:
            outs = list(outputs)
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0]

    def save(
        self,
        graph_path: Path,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
    ) -> None:
        self._data.close()
        graph = helper.make_graph(self.nodes, "edged", inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(_MS, 1)],
            producer_name="edged.export.stream_graph",
        )
        model.ir_version = 10
        onnx.save_model(model, str(graph_path))


_CONTRIB_OPS = {
    "MatMulNBits",
    "GatherBlockQuantized",
    "GroupQueryAttention",
    "SkipSimplifiedLayerNormalization",
}
"""onnxruntime's com.microsoft ops; SimplifiedLayerNormalization it registers in the default
domain."""


@dataclass
class _Build:
    w: GraphWriter
    weights: CheckpointWeights
    shape: Qwen3Shape
    quant: str
    head_bits: int = 4
    """Bits of the LM head (and the tied embedding, one matrix): 4, or 8 as llama.cpp keeps
    its output matrix wider than the rest (Q6_K in a Q4_K_M file)."""
    block_size: int = BLOCK_SIZE
    """Weights per scale along K, in every quantized matrix."""

    def linear(
        self, name: str, x: str, tensors: list[str], output: str | None = None, bits: int = 4
    ) -> str:
        """x @ Wᵀ for the weights `tensors` stacked along their rows (one fused matrix), at
        `bits` when quantized; `output` names the result (default: from the node's name)."""
        if self.quant == "fp32":
            matrix = np.concatenate([self.weights.tensor(t) for t in tensors]).T
            weight = self.w.weight(f"{name}.weight", matrix)
            return self.w.node("MatMul", [x, weight], name, [output] if output else 1)
        bands = (band for t in tensors for band in self.weights.row_bands(t, BAND_ROWS))
        q = quantize_rows(bands, bits, self.block_size)
        return self.matmul_nbits(name, x, self.block_weight(name, q), q, output)

    def block_weight(self, name: str, q: BlockMatrix) -> tuple[str, str]:
        return self.w.weight(f"{name}.weight_Q{q.bits}", q.packed), self.w.weight(
            f"{name}.weight_scales", q.scales
        )

    def matmul_nbits(
        self, name: str, x: str, names: tuple[str, str], q: BlockMatrix, output: str | None = None
    ) -> str:
        return self.w.node(
            "MatMulNBits",
            [x, *names],
            f"{name}/MatMul_Q{q.bits}",
            [output] if output else 1,
            K=q.k,
            N=q.n,
            bits=q.bits,
            block_size=q.block,
            accuracy_level=ACCURACY_LEVEL,
        )

    def norm_weight(self, name: str) -> str:
        return self.w.weight(name, self.weights.tensor(name))


def _mask_lengths(w: GraphWriter) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k (tokens seen - 1) and total_sequence_length, as int32."""
    base = "/model/attn_mask_reformat"
    total = w.node("ReduceSum", ["attention_mask", w.ints(1)], f"{base}/ReduceSum", keepdims=0)
    seqlens = w.node("Sub", [total, w.ints(1)], f"{base}/Sub")
    seqlens = w.node("Cast", [seqlens], f"{base}/Sub/Cast", to=TensorProto.INT32)
    shape = w.node("Shape", ["attention_mask"], f"{base}/Shape")
    length = w.node("Gather", [shape, w.scalar(1)], f"{base}/Gather", axis=0)
    length = w.node("Cast", [length], f"{base}/Gather/Cast", to=TensorProto.INT32)
    return seqlens, length


def _rotary_caches(w: GraphWriter, shape: Qwen3Shape, positions: int) -> tuple[str, str]:
    """cos and sin of position × inverse frequency, [positions, head_dim / 2], as HF computes."""
    exponents = np.arange(0, shape.head_dim, 2, dtype=np.int64).astype(np.float32)
    inv_freq = 1.0 / (shape.rope_theta ** (exponents / shape.head_dim))
    angles = np.outer(np.arange(positions, dtype=np.float32), inv_freq.astype(np.float32))
    cos = w.weight("cos_cache", np.cos(angles).astype(np.float32))
    sin = w.weight("sin_cache", np.sin(angles).astype(np.float32))
    return cos, sin


_Shared = tuple[tuple[str, str], BlockMatrix]
"""The matrix a tied model's embedding and LM head share: (blocks, scales) names, blocks."""


def _embedding(b: _Build) -> tuple[str, _Shared | None]:
    """The embedding lookup; for a tied quantized model also the LM head's shared matrix (at
    the head's bits: the lookup reads whatever the head multiplies by)."""
    w, s = b.w, b.shape
    table = "model.embed_tokens.weight"
    if b.quant == "fp32":
        name = w.weight(table, b.weights.tensor(table))
        return w.node("Gather", [name, "input_ids"], "/model/embed_tokens/Gather"), None
    bits = b.head_bits if s.tied else 4
    q = quantize_rows(b.weights.row_bands(table, BAND_ROWS), bits, b.block_size)
    head = "lm_head" if s.tied else "model.embed_tokens"
    names = b.block_weight(head, q)
    # GatherBlockQuantized wants the blocks as [N, K / 2]: a second initializer over the same
    # bytes of the data file, not a Reshape node, which onnxruntime would constant-fold into a
    # heap copy of the largest matrix at every load.
    rows = [q.n, q.packed.shape[1] * blob_bytes(bits, q.block)]
    flat = w.alias(f"{head}.weight_Q{bits}_rows", names[0], rows)
    out = w.node(
        "GatherBlockQuantized",
        [flat, "input_ids", names[1]],
        "/model/embed_tokens/GatherBlockQuantized",
        bits=bits,
        block_size=q.block,
        gather_axis=0,
        quantize_axis=1,
    )
    return out, ((names, q) if s.tied else None)


def _attention(b: _Build, i: int, x: str, masks: tuple[str, str], rotary: tuple[str, str]) -> str:
    w, s = b.w, b.shape
    base, prefix = f"/model/layers.{i}/attn", f"model.layers.{i}.self_attn"
    qkv = b.linear(f"{base}/qkv_proj", x, [f"{prefix}.{p}_proj.weight" for p in ("q", "k", "v")])
    q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
    split = w.node(
        "Split", [qkv, w.ints(q_size, kv_size, kv_size)], f"{base}/qkv_proj/Split", 3, axis=-1
    )
    q, k, v = split, split[:-1] + "1", split[:-1] + "2"
    # Qwen3 normalises each head of q and k (RMSNorm over head_dim) before rotary.
    normed = []
    for part, tensor, width in (("q", q, q_size), ("k", k, kv_size)):
        heads = w.node(
            "Reshape", [tensor, w.ints(0, -1, s.head_dim)], f"{base}/{part}_norm/Reshape_1"
        )
        heads = w.node(
            "SimplifiedLayerNormalization",
            [heads, b.norm_weight(f"{prefix}.{part}_norm.weight")],
            f"{base}/{part}_norm/SimplifiedLayerNormalization",
            epsilon=s.eps,
            axis=-1,
            stash_type=1,
        )
        normed.append(
            w.node("Reshape", [heads, w.ints(0, -1, width)], f"{base}/{part}_norm/Reshape_2")
        )
    gqa = f"{base}/GroupQueryAttention"
    out = w.node(
        "GroupQueryAttention",
        [*normed, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *masks, *rotary],
        gqa,
        num_heads=s.heads,
        kv_num_heads=s.kv_heads,
        scale=1.0 / math.sqrt(s.head_dim),
        local_window_size=-1,
        softcap=0.0,
        # Outputs 1 and 2, the present key and value, are the graph's outputs.
        outputs=[f"{gqa}/output_0", f"present.{i}.key", f"present.{i}.value"],
        do_rotary=1,
        rotary_interleaved=0,
    )
    return b.linear(f"{base}/o_proj", out, [f"{prefix}.o_proj.weight"])


def _mlp(b: _Build, i: int, x: str) -> str:
    w = b.w
    base, prefix = f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
    gate = b.linear(f"{base}/gate_proj", x, [f"{prefix}.gate_proj.weight"])
    up = b.linear(f"{base}/up_proj", x, [f"{prefix}.up_proj.weight"])
    sigmoid = w.node("Sigmoid", [gate], f"{base}/act_fn/Sigmoid")
    silu = w.node("Mul", [gate, sigmoid], f"{base}/act_fn/Mul")
    hidden = w.node("Mul", [silu, up], f"{base}/Mul")
    return b.linear(f"{base}/down_proj", hidden, [f"{prefix}.down_proj.weight"])


def _residual_norm(b: _Build, name: str, residual: str, delta: str, weight: str) -> tuple[str, str]:
    """(normed, residual + delta): SkipSimplifiedLayerNormalization's outputs 0 and 3."""
    node = f"/model/{name}/SkipLayerNorm"
    summed = f"{node}/output_3"
    normed = b.w.node(
        "SkipSimplifiedLayerNormalization",
        [residual, delta, b.norm_weight(weight)],
        node,
        [f"{node}/output_0", "", "", summed],  # mean and inv_std_var unused
        epsilon=b.shape.eps,
    )
    return normed, summed


def _decoder(
    b: _Build, x: str, masks: tuple[str, str], rotary: tuple[str, str], progress: bool
) -> str:
    """Every layer, then the final norm; returns the final hidden state."""
    residual = x
    x = b.w.node(
        "SimplifiedLayerNormalization",
        [x, b.norm_weight("model.layers.0.input_layernorm.weight")],
        "/model/layers.0/input_layernorm/LayerNorm",
        epsilon=b.shape.eps,
        axis=-1,
        stash_type=1,
    )
    layers = range(b.shape.layers)
    for i in bar(layers, "layers", progress, total=b.shape.layers):
        attn = _attention(b, i, x, masks, rotary)
        x, residual = _residual_norm(
            b,
            f"layers.{i}/post_attention_layernorm",
            residual,
            attn,
            f"model.layers.{i}.post_attention_layernorm.weight",
        )
        mlp = _mlp(b, i, x)
        last = i + 1 == b.shape.layers
        x, residual = _residual_norm(
            b,
            "final_norm" if last else f"layers.{i + 1}/input_layernorm",
            residual,
            mlp,
            "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight",
        )
    return x


def _lm_head(b: _Build, x: str, shared: _Shared | None, last_only: bool) -> str:
    """The logits: of the last `logits_to_keep` positions (an input that defaults to 1, so a
    runtime that never feeds it gets the last position's), or of every position."""
    w = b.w
    if last_only:
        starts = w.node("Neg", [LOGITS_KEEP], "/lm_head/prune/Neg")
        ends = w.ints(_INT64_MAX)
        x = w.node("Slice", [x, starts, ends, w.ints(1)], "/lm_head/prune/Slice")
    if shared is not None:
        names, q = shared
        return b.matmul_nbits("/lm_head", x, names, q, output="logits")
    source = "model.embed_tokens.weight" if b.shape.tied else "lm_head.weight"
    return b.linear("/lm_head", x, [source], output="logits", bits=b.head_bits)


def _io(shape: Qwen3Shape, last_only: bool) -> tuple[list[Any], list[Any]]:
    f32, kv = TensorProto.FLOAT, shape.kv_heads
    logits_positions = "logits_to_keep" if last_only else "sequence_length"
    inputs = [
        helper.make_tensor_value_info(
            "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
        ),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch_size", logits_positions, shape.vocab])
    ]
    if last_only:
        inputs.append(helper.make_tensor_value_info(LOGITS_KEEP, TensorProto.INT64, [1]))
    for i in range(shape.layers):
        for part in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{part}",
                    f32,
                    ["batch_size", kv, "past_sequence_length", shape.head_dim],
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{part}",
                    f32,
                    ["batch_size", kv, "total_sequence_length", shape.head_dim],
                )
            )
    return inputs, outputs


def build(
    checkpoint: Path,
    out_dir: Path,
    quant: str,
    context_length: int,
    last_token_logits: bool = True,
    progress: bool = False,
    head_bits: int = 4,
    block_size: int = BLOCK_SIZE,
) -> Qwen3Shape:
    """Write `model.onnx`, `model.onnx.data` and `genai_config.json` for `checkpoint` into
    `out_dir`; `quant` is "int4" (MatMulNBits, round-to-nearest) or "fp32"; `head_bits` the
    LM head's (and a tied embedding's) bits in an int4 graph, 4 or 8; `block_size` the
    weights per scale of every quantized matrix."""
    if quant not in ("int4", "fp32"):
        raise ExportError(
            f"quant = {quant!r} is not supported by the stream exporter (int4, fp32); "
            "use exporter 'optimum' for int8"
        )
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    shape = Qwen3Shape.from_config(config, checkpoint / "config.json")
    weights = CheckpointWeights(checkpoint)
    w = GraphWriter(out_dir / "model.onnx.data")
    b = _Build(w, weights, shape, quant, head_bits, block_size)
    masks = _mask_lengths(w)
    if last_token_logits:
        # An input with a default: an initializer of the same name, which a run may override.
        w.constant_input(LOGITS_KEEP, np.array([1], dtype=np.int64))
    x, shared = _embedding(b)
    rotary = _rotary_caches(w, shape, context_length)
    hidden = _decoder(b, x, masks, rotary, progress)
    _lm_head(b, hidden, shared, last_token_logits)
    w.save(out_dir / "model.onnx", *_io(shape, last_token_logits))
    (out_dir / "genai_config.json").write_text(
        json.dumps(genai_config(shape, config, context_length), indent=4) + "\n"
    )
    return shape


def genai_config(shape: Qwen3Shape, config: dict[str, Any], context_length: int) -> dict[str, Any]:
    """onnxruntime-genai's runtime config for this graph (the engine reads the KV layout and
    `past_present_share_buffer` from it; onnxruntime-genai itself can run the model too)."""
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": shape.head_dim,
        "hidden_size": shape.hidden,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
    }
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id"),
            "context_length": context_length,
            "decoder": decoder,
            "eos_token_id": config.get("eos_token_id"),
            "pad_token_id": config.get("pad_token_id") or config.get("eos_token_id"),
            "type": str(config.get("model_type", "qwen3")),
            "vocab_size": shape.vocab,
        },
        "search": {"max_length": context_length, "past_present_share_buffer": True},
    }
