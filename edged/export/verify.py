"""Numerical checks of an export: the graph must say what the checkpoint says.

A deliberately plain numpy + onnxruntime loop (growing past/present KV, no engine code), so a bug
in the engine cannot hide a bug in the export and the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .options import ExportError

log = logging.getLogger(__name__)

GREEDY_NEW_TOKENS = 24
GREEDY_PROMPT = "My wearable says my heart rate is 128 bpm and my SpO2 is 91%. What should I do?"
AGREEMENT_PROMPTS = (
    "Resting heart rate this morning was 58 bpm, lower than usual.",
    "Temperature 38.4 °C since last night with chills and a headache.",
    "The oximeter reads 89% at rest and I feel short of breath.",
    "I feel dizzy when I stand up quickly; blood pressure was 96/60 mmHg.",
    "Chest pain radiating to the left arm with sweating needs emergency care.",
    "Blood glucose is 3.1 mmol/L and I feel shaky and confused.",
    "Patients with COPD may have a target saturation of 88–92%.",
    "心率 每分钟 72 次，血氧 98%。Measure again after five minutes of rest.",
)
LAST_LOGITS_ATOL = 1e-4
"""fp32 reassociation noise between slicing before and after the head stays far below this."""


@dataclass(frozen=True)
class KvLayout:
    names: tuple[tuple[str, str], ...]
    """(key input, value input) per layer, in layer order."""
    kv_heads: int
    head_dim: int
    dtype: Any


class OnnxCausalLM:
    """An optimum-layout decoder graph driven one call at a time with its past KV."""

    def __init__(self, graph: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.layout = _kv_layout(self.session)

    def empty_past(self) -> dict[str, np.ndarray]:
        shape = (1, self.layout.kv_heads, 0, self.layout.head_dim)
        return {
            name: np.zeros(shape, dtype=self.layout.dtype)
            for pair in self.layout.names
            for name in pair
        }

    def feeds(self, ids: Sequence[int], past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs for `ids` following `past`: full attention mask, positions past_len.."""
        past_len = next(iter(past.values())).shape[2]
        n = len(ids)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_len + n), dtype=np.int64),
            **past,
        }
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None, :]
        return feeds

    def step(
        self, ids: Sequence[int], past: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run `ids` after `past`; return the last position's logits (vocab,) and the new past."""
        outputs = self.session.run(None, self.feeds(ids, past))
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outputs, strict=True))
        new_past = {
            key: result[key.replace("past_key_values", "present")]
            for pair in self.layout.names
            for key in pair
        }
        return result["logits"][0, -1].astype(np.float32), new_past

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Raw `logits` output of one prefill call: (1, n, vocab) or (1, 1, vocab)."""
        return self.session.run(["logits"], self.feeds(ids, self.empty_past()))[0]

    def greedy(self, prompt: Sequence[int], new_tokens: int, eos: Iterable[int]) -> list[int]:
        """Argmax decoding, stopping after an eos token like transformers does."""
        stop = set(eos)
        logits, past = self.step(prompt, self.empty_past())
        out: list[int] = []
        for _ in range(new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if token in stop:
                break
            logits, past = self.step([token], past)
        return out

    def next_token_argmax(self, ids: Sequence[int]) -> list[int]:
        """Teacher-forced: the argmax after each prefix ids[:1], ids[:2], ... one token a call,
        which works whether the graph returns all logits or only the last."""
        past = self.empty_past()
        out = []
        for token in ids:
            logits, past = self.step([token], past)
            out.append(int(np.argmax(logits)))
        return out


def _kv_layout(session: Any) -> KvLayout:
    names = [i.name for i in session.get_inputs()]
    layers = sorted(
        {int(n.split(".")[1]) for n in names if n.startswith("past_key_values.")},
    )
    if not layers:
        raise ExportError(f"graph has no past_key_values.N.key inputs (inputs: {names})")
    pairs = tuple((f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in layers)
    first = next(i for i in session.get_inputs() if i.name == pairs[0][0])
    kv_heads, head_dim = first.shape[1], first.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ExportError(f"{first.name} has shape {first.shape}; expected static heads/head_dim")
    dtype = np.float16 if first.type == "tensor(float16)" else np.float32
    return KvLayout(pairs, kv_heads, head_dim, dtype)


def prompt_ids(tokenizer: Any, text: str = GREEDY_PROMPT) -> list[int]:
    """The verification prompt, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def transformers_greedy(
    model: Any, prompt: Sequence[int], new_tokens: int, eos: Sequence[int], pad: int | None
) -> list[int]:
    import torch

    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            eos_token_id=list(eos),
            pad_token_id=pad if pad is not None else (eos[0] if eos else None),
        )
    return [int(t) for t in out[0, len(prompt) :]]


def check_greedy_parity(
    graph: OnnxCausalLM,
    model: Any,
    prompt: Sequence[int],
    eos: Sequence[int],
    pad: int | None,
    new_tokens: int = GREEDY_NEW_TOKENS,
) -> dict[str, Any]:
    """Greedy tokens of the ONNX graph must equal transformers' `generate(do_sample=False)`."""
    expected = transformers_greedy(model, prompt, new_tokens, eos, pad)
    return check_greedy_tokens(graph.greedy(prompt, new_tokens, eos), expected, len(prompt))


def check_greedy_tokens(got: list[int], expected: list[int], prompt_tokens: int) -> dict[str, Any]:
    """The fp32 graph's greedy tokens must be transformers' own; raises where they part."""
    if got != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        raise ExportError(
            f"fp32 ONNX greedy tokens differ from transformers at new token {at}: "
            f"onnx {got[at : at + 4]} vs transformers {expected[at : at + 4]} "
            f"(prompt of {prompt_tokens} tokens); the export is not faithful"
        )
    log.info("fp32 graph matches transformers on %d greedy tokens", len(got))
    return {"tokens_equal": True, "new_tokens": len(got), "prompt_tokens": prompt_tokens}


@dataclass(frozen=True)
class Reference:
    """What transformers says, computed before any ONNX session exists (one model in memory)."""

    dtype: str
    greedy: list[int] | None
    """Greedy continuation of the prompt given, if one was."""
    argmax: list[list[int]]
    """Teacher-forced next-token argmax at every position of each agreement prompt."""


def transformers_reference(
    checkpoint: Path,
    prompt: Sequence[int] | None,
    prompts: Sequence[Sequence[int]],
    eos: Sequence[int],
    pad: int | None,
    dtype: str = "float32",
) -> Reference:
    """Run the checkpoint in transformers once, keep only token ids, and free the model. The
    greedy continuation (24 decode steps) is generated only for a `prompt` given: only an fp32
    graph is held to it."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    greedy = None
    if prompt is not None:
        greedy = transformers_greedy(model, prompt, GREEDY_NEW_TOKENS, eos, pad)
    argmax = []
    for ids in prompts:
        with torch.no_grad():
            argmax.append(model(torch.tensor([list(ids)])).logits[0].argmax(-1).tolist())
    del model
    gc.collect()
    return Reference(dtype, greedy, argmax)


def agreement_with(
    candidate: OnnxCausalLM, reference: Reference, prompts: Sequence[Sequence[int]]
) -> tuple[float, int]:
    """Share of teacher-forced positions where the graph picks transformers' next token."""
    return _agreement(
        (candidate.next_token_argmax(ids), expected)
        for ids, expected in zip(prompts, reference.argmax, strict=True)
    )


def _agreement(pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> tuple[float, int]:
    """(share of equal positions, positions) over pairs of next-token sequences."""
    same = total = 0
    for got, expected in pairs:
        same += sum(int(a == b) for a, b in zip(got, expected, strict=True))
        total += len(got)
    if total == 0:
        raise ExportError("agreement prompts tokenized to nothing")
    return same / total, total


def check_last_logits(full: OnnxCausalLM, last: OnnxCausalLM, ids: Sequence[int]) -> float:
    """The sliced graph's logits must equal the last row of the unmodified graph's."""
    reference = full.logits(ids)[0, -1]
    sliced = last.logits(ids)
    if sliced.shape[1] != 1:
        raise ExportError(f"last-token graph returned logits of shape {sliced.shape}, not (1,1,V)")
    diff = float(np.max(np.abs(sliced[0, 0] - reference)))
    if diff > LAST_LOGITS_ATOL:
        raise ExportError(
            f"last-token logits differ from the full graph's last row by {diff:.3g} "
            f"(limit {LAST_LOGITS_ATOL})"
        )
    return diff


def top1_agreement(
    candidate: OnnxCausalLM,
    reference: OnnxCausalLM,
    prompts: Sequence[Sequence[int]],
    progress: bool = False,
) -> tuple[float, int]:
    """Share of teacher-forced positions where both graphs pick the same next token."""
    from .progress import bar

    return _agreement(
        (candidate.next_token_argmax(ids), reference.next_token_argmax(ids))
        for ids in bar(prompts, desc="top-1 agreement", enabled=progress)
    )
