"""GGUF in: a llama.cpp model file turned back into a Hugging Face checkpoint, so the normal
export and its verification run on it (`edged model export FILE.gguf OUT`).

MedPsy and most small models are published as GGUF as well as safetensors; a clinic that
downloaded the GGUF should not need the other. The `gguf` package reads the file: its metadata
gives the model's shape and tokenizer, and every tensor is dequantized and written, one at a
time, as bfloat16 (the dtype the models are published in: it keeps the import and the
verification's reference model at half the memory of float32; its rounding, 2^-9 relative, is
far below the int4 step the exporter then quantizes to its own way; `edged model eval`
measures what the round trip costs). A
directory holding one GGUF and a `tokenizer.json` is read with that tokenizer instead of the one
rebuilt from the metadata.

Supported: architecture `qwen3` (and `qwen2`, the same graph without q/k norms) with the GPT-2
style BPE tokenizer and Qwen's or GPT-2's pre-tokenizer (or the tokenizer.json itself in
`tokenizer.huggingface.json`); tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
Q3_K, Q4_K, Q5_K and Q6_K (what llama.cpp's Q4_K_M, Q5_K_M, Q6_K and Q8_0 files hold). Anything
else is refused with a message naming it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import ExportError
from .weights import write_safetensors

log = logging.getLogger(__name__)

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
TOKENIZER_PRE = ("qwen2", "gpt-2")
"""llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) that can be rebuilt: Qwen's split, and
GPT-2's (ByteLevel's own regex; the demo model's)."""
# Qwen2/Qwen3's pre-tokenizer split (tokenizer.json of Qwen/Qwen3-0.6B).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def find_gguf(source: str) -> Path | None:
    """The GGUF file `source` names (a file, or a directory holding exactly one), else None."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ExportError(f"{path}: holds {len(found)} GGUF files; name the one to export")
        return found[0] if found else None
    return None


@dataclass(frozen=True)
class GgufSummary:
    architecture: str
    tensor_types: dict[str, int]
    """Type name -> number of tensors of it."""


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def check(reader: Any, path: Path) -> GgufSummary:
    """Refuse, naming the reason, a GGUF this importer cannot turn into a checkpoint."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"{path}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    types: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in TENSOR_TYPES:
            raise ExportError(
                f"{path}: tensor {t.name} is {name}, which edged cannot import "
                f"(supported: {', '.join(TENSOR_TYPES)})"
            )
        types[name] = types.get(name, 0) + 1
    return GgufSummary(arch, types)


def _config(reader: Any, arch: str, vocab_rows: int, tied: bool) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ExportError(f"GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(get("context_length")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": vocab_rows,
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


# llama.cpp's tensor names for Qwen2/Qwen3 (convert_hf_to_gguf.py) and Hugging Face's.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """blk.0.attn_q.weight -> model.layers.0.self_attn.q_proj.weight."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ExportError(f"GGUF tensor {gguf_name} has no Hugging Face name (Qwen2/Qwen3)")


def _write_weights(reader: Any, path: Path) -> dict[str, tuple[int, ...]]:
    """Dequantize every tensor into a bfloat16 safetensors file, one tensor at a time; returns
    the Hugging Face names and shapes."""
    import gguf

    by_name = {hf_name(t.name): t for t in reader.tensors}
    # GGUF lists the fastest dimension first.
    shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in by_name.items()}

    def dequantized(name: str) -> Any:
        t = by_name[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shapes[name])

    write_safetensors(path, list(shapes.items()), dequantized, dtype="BF16")
    return shapes


def _tokenizer(reader: Any, out: Path) -> None:
    """The GGUF's tokenizer as a transformers tokenizer in `out`: the tokenizer.json the file
    carries (`tokenizer.huggingface.json`, the GGUF spec's key for it, written when llama.cpp
    has no name for the model's pre-tokenizer), else rebuilt from the vocabulary and merges."""
    from transformers import PreTrainedTokenizerFast

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    tok = _embedded_tokenizer(reader, tokens, types) or _rebuilt_tokenizer(reader, tokens, types)
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        pad_token=tokens[pad_id] if pad_id is not None else None,
        clean_up_tokenization_spaces=False,
        chat_template=_field(reader, "tokenizer.chat_template"),
        model_input_names=["input_ids", "attention_mask"],
    )
    hf.save_pretrained(out)


def _embedded_tokenizer(reader: Any, tokens: list[str], types: list[int]) -> Any:
    """The tokenizer.json in the GGUF's metadata, checked against its token list; or None."""
    from gguf import Keys, TokenType
    from tokenizers import Tokenizer

    text = _field(reader, Keys.Tokenizer.HF_JSON)
    if text is None:
        return None
    tok = Tokenizer.from_str(text)
    for i, (t, k) in enumerate(zip(tokens, types, strict=True)):
        if k != TokenType.UNUSED and tok.token_to_id(t) != i:
            raise ExportError(
                f"GGUF {Keys.Tokenizer.HF_JSON} gives token {t!r} id {tok.token_to_id(t)}, "
                f"where tokenizer.ggml.tokens has {i}"
            )
    return tok


def _rebuilt_tokenizer(reader: Any, tokens: list[str], types: list[int]) -> Any:
    """Rebuild the byte-level BPE tokenizer from the GGUF's vocabulary and merges."""
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre not in TOKENIZER_PRE:
        raise ExportError(
            f"tokenizer {model!r} with pre-tokenizer {pre!r} cannot be rebuilt (supported: gpt2 "
            f"with {', '.join(TOKENIZER_PRE)}); put the model's tokenizer.json beside the GGUF"
        )
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {
        t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == TokenType.NORMAL
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    for i, (t, k) in enumerate(zip(tokens, types, strict=True)):
        if k in (TokenType.CONTROL, TokenType.USER_DEFINED):
            added = AddedToken(t, normalized=False, special=k == TokenType.CONTROL)
            (tok.add_special_tokens if k == TokenType.CONTROL else tok.add_tokens)([added])
            if tok.token_to_id(t) != i:
                raise ExportError(f"GGUF token {t!r} landed at id {tok.token_to_id(t)}, not {i}")
    return tok


def _pre_tokenizer(pre: str) -> Any:
    """The split llama.cpp applies for `pre` (one of TOKENIZER_PRE), as a tokenizers object."""
    from tokenizers import Regex, pre_tokenizers

    if pre == "gpt-2":  # ByteLevel's own regex is GPT-2's
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def gguf_to_checkpoint(path: Path, out: Path) -> GgufSummary:
    """Write a bfloat16 Hugging Face checkpoint for the GGUF at `path` into `out`."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    summary = check(reader, path)
    arch = summary.architecture
    out.mkdir(parents=True, exist_ok=True)
    shapes = _write_weights(reader, out / "model.safetensors")
    if "model.embed_tokens.weight" not in shapes:
        raise ExportError(f"{path}: no token_embd.weight tensor")
    tied = "lm_head.weight" not in shapes
    vocab_rows = shapes["model.embed_tokens.weight"][0]
    config = _config(reader, arch, vocab_rows, tied)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = config["eos_token_id"]
    generation = {
        "eos_token_id": eos,
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if config["bos_token_id"] is not None:
        generation["bos_token_id"] = config["bos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    beside = path.parent / "tokenizer.json"
    if beside.is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path.parent).save_pretrained(out)
    else:
        _tokenizer(reader, out)
    log.info("GGUF %s: %s, tensors %s", path.name, arch, summary.tensor_types)
    return summary
