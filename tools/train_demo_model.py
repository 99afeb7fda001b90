#!/usr/bin/env python3
"""Train the demo model: a small Qwen3 on the project's synthetic clinical dialogues (#12).

From a fixed seed, on the CPU: a byte-level BPE tokenizer trained on the corpus
(`tools/make_clinical_corpus.py`), a Qwen3-architecture model of a few million parameters, and
AdamW on the assistant turns only, for a fixed time budget (the learning-rate schedule runs on
the clock, so it ends on time). Then the project's own exporter makes the int4 edged model.
The result reads as advice and quotes the wearer's numbers where the corpus does (exactly, in
95 % of the held-out answers: edged/models/README.md); it knows nothing else. It is **a demo
model trained on synthetic dialogues, not a medical model**, and its manifest says so.

    python tools/make_clinical_corpus.py --out ~/.cache/edged/demo-corpus
    python tools/train_demo_model.py --corpus ~/.cache/edged/demo-corpus \\
        --checkpoint tests/fixtures/demo-clinical-hf --export edged/models/demo-clinical-int4
    python tools/train_demo_model.py --export-only \\
        --checkpoint tests/fixtures/demo-clinical-hf --export edged/models/demo-clinical-int4

Training is seeded but not bit-reproducible across machines (BLAS kernels differ); the export
from the committed checkpoint is (`--export-only`, checked by tests/test_demo_model.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import make_clinical_corpus  # noqa: E402  (sibling scripts: their directory is on sys.path)
import make_test_model  # noqa: E402

log = logging.getLogger("train_demo_model")

SEED = 1202
DESCRIPTION = (
    "demo model trained on synthetic dialogues; not a medical model. It reads the wearer's "
    "vitals block and answers in the corpus's templates (tools/make_clinical_corpus.py)."
)
NAME = "edged-demo-clinical"
BPE_VOCAB = 4091
"""A ceiling: the templated dialogues saturate below it."""
PRE_TOKENIZER = "numbers"
"""GPT-2's split, decimals kept whole (make_test_model.NUMBERS_SPLIT_REGEX): a reading and the
space before it are one token (" 104", " 36.7"), where Qwen's split writes a space token and
one token per digit. That decides whether a small model learns to quote the wearer's numbers:
with one token per number, "heart rate: 104" in the answer is a copy of the token that followed
"heart rate:" in the prompt (an induction head, learnt early); with digits, every number starts
with the same space token and shares its digits with others, so each digit needs a longer
match. Measured (edged/models/README.md): all abnormal values quoted exactly in 14 % of the
answers with Qwen's split, 35 % with GPT-2's, and most of the misses left were temperatures,
whose decimal GPT-2 splits off ("36", ".", "7": the digit after the point needs a four-token
match to tell "now" from "lowest"); 95 % with this split (and the read-back dialogues and
plain readings of make_clinical_corpus.py)."""
NUMBERS = [str(n) for n in range(0, 301)] + [f"{t / 10:.1f}" for t in range(300, 440)]
"""Values a vitals block can hold (counts, rates, pressures, temperatures in one decimal):
trained into the vocabulary whole, with and without the space before, so a reading the corpus
never drew is still one token."""
SHAPE: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 1024,
}
MAX_LEN = 640
"""Longest training sequence in tokens (a dialogue is about 300)."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenizer_lines(dialogues: list[dict[str, Any]]) -> list[str]:
    """Every message text, once: what the BPE merges are learnt from."""
    seen: set[str] = set()
    lines = []
    for d in dialogues:
        for m in d["messages"]:
            if m["content"] not in seen:
                seen.add(m["content"])
                lines.append(m["content"])
    return lines


def number_lines() -> list[str]:
    """NUMBERS as tokenizer training text: each with a space before it and without."""
    return [" ".join(NUMBERS), ",".join(NUMBERS)]


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], int] | None:
    """(token ids of the whole chat, number of prompt tokens not trained on) or None if too
    long. The loss covers the assistant's turn: its think block, answer and <|im_end|>."""
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise RuntimeError("the chat template renders the prompt differently inside the chat")
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if len(ids) > MAX_LEN:
        return None
    return ids, start


def batches(
    examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Index batches of similar length (little padding), in random order."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return groups


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def build_model(tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab = -(-len(tokenizer) // make_test_model.VOCAB_MULTIPLE) * make_test_model.VOCAB_MULTIPLE
    config = Qwen3Config(
        **SHAPE,
        vocab_size=vocab,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        dtype="float32",
    )
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config)
    # Greedy by default: the daemon decodes greedily unless model.temperature says otherwise.
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    return model


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10 % of the peak by the end of
    the time budget (`progress` is the fraction of it used): the schedule ends on time
    whatever the machine's speed, or a busy neighbour, does to the step time."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(model: Any, examples: list[tuple[list[int], int]], pad_id: int) -> float:
    """Mean loss per trained token on `examples` (the held-out split)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            batch = collate(examples[i : i + 32], pad_id)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    model.train()
    return total / max(1, count)


def bf16_matmul_in_hardware() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AMX or AVX-512 BF16, Arm's BF16
    extension). Only there is mixed precision faster: elsewhere oneDNN emulates it, slower
    than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16", "bf16"))


def autocast(precision: str) -> Any:
    """The forward pass's precision context: bfloat16 matmuls with float32 master weights and
    optimizer state (torch's CPU autocast), or plain float32."""
    import contextlib

    import torch

    if precision == "auto":
        precision = "bf16" if bf16_matmul_in_hardware() else "fp32"
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Forward:
    """The model's forward, through torch.compile (dynamic shapes: batches differ in length):
    about 2x the steps per minute of eager mode on 2 cores, for about 90 s of compilation in
    the first steps, out of the budget. Compilation fails at the first call when it fails
    (no C++ compiler, an unsupported CPU); training then goes on in eager mode, the same
    training in fewer steps."""

    def __init__(self, model: Any, compile_it: bool) -> None:
        import torch

        self.model = model
        self.compiled = torch.compile(model, dynamic=True) if compile_it else None

    def __call__(self, **batch: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(**batch)
            except Exception as e:  # noqa: BLE001 - any compiler failure means eager mode
                log.warning("torch.compile failed (%s): training in eager mode", e)
                self.compiled = None
        return self.model(**batch)


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    rng = random.Random(SEED)
    dialogues = read_jsonl(args.corpus / "train.jsonl")
    mcq_items = read_jsonl(args.corpus / "mcq_train.jsonl")
    heldout = read_jsonl(args.corpus / "heldout.jsonl")[: args.eval_examples]
    args.checkpoint.mkdir(parents=True, exist_ok=True)
    lines = tokenizer_lines(dialogues) + make_test_model.corpus() + number_lines()
    tokenizer = make_test_model.build_tokenizer(
        args.checkpoint, lines, BPE_VOCAB, exact=False, pre=PRE_TOKENIZER
    )
    mcq_chat = make_clinical_corpus.mcq_chat
    chats = [d["messages"] for d in dialogues] + [mcq_chat(m)["messages"] for m in mcq_items]
    examples = [e for e in (encode(tokenizer, c) for c in chats) if e is not None]
    held = [e for e in (encode(tokenizer, d["messages"]) for d in heldout) if e is not None]
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = build_model(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    log.info("%d examples, %.1fM parameters", len(examples), params / 1e6)
    # No weight decay on the (tied) embedding: decay shrinks what makes one number token
    # different from its neighbours, and quoting a reading exactly needs exactly that.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    forward = Forward(model, args.compile)
    order = batches(examples, args.batch, rng)
    budget_s = args.minutes * 60
    started = time.monotonic()
    tokens_seen = 0
    losses: list[float] = []
    bar = tqdm(total=int(budget_s), desc="training", unit="s", file=sys.stderr)
    step = 0
    model.train()
    while step < args.max_steps and (elapsed := time.monotonic() - started) < budget_s:
        group = order[step % len(order)]
        if step and step % len(order) == 0:
            order = batches(examples, args.batch, rng)
        batch = collate([examples[i] for i in group], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, elapsed / budget_s, args.lr, args.warmup)
        with autocast(args.precision):
            loss = forward(**batch).loss  # over the answer tokens: labels are -100 elsewhere
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens_seen += int(batch["attention_mask"].sum())
        step += 1
        bar.n = min(int(budget_s), int(time.monotonic() - started))
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    train_s = time.monotonic() - started
    held_loss = evaluate(model, held, pad_id)
    model.save_pretrained(args.checkpoint, safe_serialization=True)
    _to_bf16(args.checkpoint)
    report = {
        "parameters": params,
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_minutes": round(train_s / 60, 1),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "heldout_loss": round(held_loss, 4),
        "examples": len(examples),
        "threads": args.threads,
        "compiled": forward.compiled is not None,
        "precision": "bf16" if isinstance(autocast(args.precision), torch.autocast) else "fp32",
    }
    (args.checkpoint / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _to_bf16(checkpoint: Path) -> None:
    """Store the weights as bfloat16 (half the size in the repository); the exporter reads
    them back as float32, so the export from this file is what is reproducible."""
    import torch
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = {k: v.to(dtype=torch.bfloat16) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((checkpoint / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export(checkpoint: Path, out: Path, exporter: str = "stream") -> Any:
    from edged.export import ExportOptions, export_model

    return export_model(
        ExportOptions(
            source=str(checkpoint),
            output=out,
            quant="int4",
            exporter=exporter,
            name=NAME if exporter == "stream" else f"{NAME}-{exporter}",
            description=DESCRIPTION,
            overwrite=True,
            source_label="tools/train_demo_model.py (tests/fixtures/demo-clinical-hf)",
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="directory written by make_clinical_corpus.py")
    ap.add_argument("--checkpoint", type=Path, required=True, help="HF checkpoint directory")
    ap.add_argument("--export", type=Path, default=None, help="write the int4 edged model here")
    ap.add_argument("--export-only", action="store_true", help="export an existing checkpoint")
    ap.add_argument(
        "--exporter",
        choices=("stream", "optimum", "ort-genai"),
        default="stream",
        help="default: stream, edged's default exporter (the GroupQueryAttention graph)",
    )
    ap.add_argument("--minutes", type=float, default=28.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="train in eager mode (torch.compile needs a C++ compiler; about half the steps)",
    )
    ap.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="forward-pass precision; auto: bf16 where the CPU multiplies bfloat16 natively "
        "(1.75x the tokens per minute on an AMX Xeon), else fp32",
    )
    ap.add_argument("--eval-examples", type=int, default=300)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.export_only:
        if args.corpus is None:
            ap.error("--corpus is required unless --export-only")
        print(json.dumps(train(args), indent=2))
    if args.export is not None:
        manifest = export(args.checkpoint, args.export, args.exporter)
        print(json.dumps({"exported": str(args.export), **manifest.verification}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
