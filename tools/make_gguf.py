#!/usr/bin/env python3
"""Write a GGUF file from a Hugging Face Qwen3 checkpoint, as llama.cpp's converter would.

For testing `edged model export FILE.gguf` on a GGUF made here (no machine here reaches a model
hub), and for the quality comparison with llama.cpp (#12). It uses the `gguf` package's writer
and quantizers: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1. K-quants (Q4_K_M, ...) need
llama.cpp's own quantizer: write F16 here, then quantize it with llama.cpp
(`tools/quality_table.py` does that through llama-cpp-python).

    python tools/make_gguf.py tests/fixtures/demo-clinical-hf /tmp/demo-q8_0.gguf --type Q8_0

Metadata, tensor names and the tokenizer follow llama.cpp's `convert_hf_to_gguf.py` for
Qwen3 (architecture `qwen3`, BPE tokenizer `gpt2` with pre-tokenizer `qwen2` or `gpt-2` (and
the tokenizer.json itself when llama.cpp has no name for its split), the vocabulary padded to
the embedding's rows with unused `[PADn]` tokens, no output tensor when the
embedding is tied), so llama.cpp loads the file and so does transformers' GGUF reader.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edged.export.gguf_import import QWEN_SPLIT

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def file_type(name: str) -> int:
    """llama.cpp's general.file_type for a type name: F32, F16, Q4_0, ..., Q4_K_M."""
    import gguf

    return int(gguf.LlamaFileType["ALL_F32" if name == "F32" else f"MOSTLY_{name}"])


def tokenizer_vocab(checkpoint: Path, rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order padded to `rows`, their types, BPE merges as "a b")."""
    from gguf import TokenType

    data = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in vocab.items()}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = (
            added["content"],
            TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED,
        )
    tokens, types = [], []
    for i in range(rows):
        token, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def _metadata(writer: Any, config: dict[str, Any], checkpoint: Path, qtype: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(checkpoint.name)
    writer.add_file_type(file_type(qtype))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))


def tokenizer_pre(checkpoint: Path) -> tuple[str, bool]:
    """(llama.cpp's name for the checkpoint's pre-tokenizer, whether the GGUF must carry the
    tokenizer itself). llama.cpp applies a pre-tokenizer by its name (`tokenizer.ggml.pre`):
    `qwen2` (Qwen's split) and `gpt-2` (ByteLevel's own regex) are exact. The demo model's split
    (GPT-2's with decimals whole) has no name there: it is written as `gpt-2`, the nearest, and
    the tokenizer.json goes into `tokenizer.huggingface.json`, the GGUF spec's key for it, which
    `edged model export FILE.gguf` reads first. (llama.cpp itself then splits a decimal where
    the model would not; tools/quality_table.py hands llama.cpp token ids, never text.)"""
    pre = json.loads((checkpoint / "tokenizer.json").read_text())["pre_tokenizer"]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex"):
        return "gpt-2", False
    if pre.get("type") == "Sequence" and pre["pretokenizers"][0].get("type") == "Split":
        regex = pre["pretokenizers"][0]["pattern"].get("Regex")
        if regex == QWEN_SPLIT:  # edged.export.gguf_import rebuilds exactly this one
            return "qwen2", False
        return "gpt-2", True
    raise ValueError(f"{checkpoint}/tokenizer.json: pre-tokenizer {pre} is not one llama.cpp knows")


def _tokenizer(writer: Any, checkpoint: Path, config: dict[str, Any]) -> None:
    import gguf

    tokens, types, merges = tokenizer_vocab(checkpoint, config["vocab_size"])
    pre, embed = tokenizer_pre(checkpoint)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    if embed:
        writer.add_string(gguf.Keys.Tokenizer.HF_JSON, (checkpoint / "tokenizer.json").read_text())
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    gen = json.loads((checkpoint / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if gen.get("pad_token_id") is not None:
        writer.add_pad_token_id(gen["pad_token_id"])
    if config.get("bos_token_id") is not None:
        writer.add_bos_token_id(config["bos_token_id"])
    writer.add_add_bos_token(False)
    template = checkpoint / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())


def _tensor(writer: Any, name: str, array: np.ndarray, qtype: str) -> None:
    import gguf

    # Norms and other 1-D tensors stay F32, as llama.cpp's converter keeps them.
    kind = "F32" if array.ndim == 1 else qtype
    if kind == "F32":
        writer.add_tensor(name, array.astype(np.float32))
    elif kind == "F16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        qt = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(array, qt), raw_dtype=qt)


def _checkpoint_tensors(checkpoint: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of every tensor, one at a time, from a single or sharded
    safetensors checkpoint: the writer keeps the converted tensors until it writes them, but
    the checkpoint's own copy is never all in memory (a 4B checkpoint is 8 GB in bf16)."""
    import torch
    from safetensors import safe_open

    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{checkpoint}: no model*.safetensors")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield hf_name, f.get_tensor(hf_name).to(torch.float32).numpy()


def write_gguf(checkpoint: Path, out: Path, qtype: str = "F16") -> Path:
    import gguf

    if qtype not in TYPES:
        raise ValueError(f"type = {qtype!r} is not one of {', '.join(TYPES)}")
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("model_type") != "qwen3":
        raise ValueError(f"{checkpoint}: model_type {config.get('model_type')!r}, not qwen3")
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    _metadata(writer, config, checkpoint, qtype)
    _tokenizer(writer, checkpoint, config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config["num_hidden_layers"])
    for hf_name, array in _checkpoint_tensors(checkpoint):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{checkpoint}: no GGUF name for tensor {hf_name}")
        _tensor(writer, name, array, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="HF Qwen3 checkpoint directory")
    ap.add_argument("out", type=Path, help="GGUF file to write")
    ap.add_argument("--type", choices=TYPES, default="F16", help="tensor type (default F16)")
    args = ap.parse_args(argv)
    write_gguf(args.checkpoint, args.out, args.type)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.2f} MB ({args.type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
