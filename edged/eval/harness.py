"""Run an evaluation: a model directory (and optionally a reference one) over data rows.

Everything is teacher-forced through the engine's own runner (`Engine.logits_for`), so a
score measures the exported graph exactly as the daemon runs it; answers to dialogue rows are
generated greedily, as the daemon does by default, and read by the guard's own code.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.clinical.advice import guard_text
from edged.config.models import ClinicalConfig
from edged.engine import Engine, GenerationConfig
from edged.eval.checks import carries, cites_all, states_news2
from edged.eval.datasets import EvalDataError, Row, mcq_answer, mcq_user_message
from edged.eval.scoring import (
    best_option,
    kl_divergence,
    perplexity,
    token_logprobs,
    top1_agreement,
)

ESCALATIONS = tuple(ClinicalConfig().escalation.values())
"""The default escalation sentences: one in an answer that was due none is a false alarm."""


@dataclass
class Tally:
    nll: float = 0.0
    tokens: int = 0
    texts: int = 0
    mcq_items: int = 0
    mcq_right: int = 0
    mcq_right_norm: int = 0
    positions: int = 0
    agree: int = 0
    kl: float = 0.0
    generated: int = 0
    cite_items: int = 0
    cited: int = 0
    scored: int = 0
    news2_right: int = 0
    due: int = 0
    escalated: int = 0
    not_due: int = 0
    false_escalations: int = 0
    contradictions: int = 0
    contradictions_after_guard: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class EvalOptions:
    generate: bool = True
    """Generate answers to dialogue rows and check what they say (slower)."""
    max_new_tokens: int = 160
    examples: int = 3
    """Generated answers kept in the report, to read."""


def split_chat(engine: Engine, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt ids up to the assistant's turn, the assistant turn's ids) as the chat template
    renders the whole dialogue."""
    prompt_text = engine.tokenizer.render(list(messages[:-1]), add_generation_prompt=True)
    full_text = engine.tokenizer.render(list(messages), add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise EvalDataError("the chat template renders the prompt differently inside the chat")
    prompt = engine.tokenizer.encode(prompt_text)
    return prompt, engine.tokenizer.encode(full_text[len(prompt_text) :])


def _score(
    engine: Engine, reference: Engine | None, prompt: list[int], target: list[int], t: Tally
) -> None:
    logits = engine.logits_for(prompt, [target])[0]
    t.nll -= float(token_logprobs(logits, target).sum())
    t.tokens += len(target)
    if reference is not None:
        ref = reference.logits_for(prompt, [target])[0]
        t.positions += len(target)
        t.agree += top1_agreement(logits, ref)
        t.kl += float(kl_divergence(ref, logits).sum())


def _dialogue(
    engine: Engine, reference: Engine | None, row: Row, opts: EvalOptions, t: Tally
) -> None:
    messages = row.data["messages"]
    prompt, target = split_chat(engine, messages)
    _score(engine, reference, prompt, target, t)
    t.texts += 1
    meta = row.data.get("meta")
    if not opts.generate or not isinstance(meta, dict):
        return
    config = GenerationConfig(max_new_tokens=opts.max_new_tokens)
    answer = engine.chat(messages[:-1], config, enable_thinking=False).text
    _check_answer(answer, meta, t)
    if len(t.examples) < opts.examples:
        t.examples.append({"question": meta.get("question"), "answer": answer})


def _check_answer(answer: str, meta: dict[str, Any], t: Tally) -> None:
    t.generated += 1
    cite = [str(v) for v in meta.get("cite") or []]
    if cite:
        t.cite_items += 1
        t.cited += cites_all(answer, cite)
    if isinstance(meta.get("news2"), int):
        t.scored += 1
        t.news2_right += states_news2(answer, meta["news2"])
    due = meta.get("escalation")
    if due:
        t.due += 1
        t.escalated += carries(answer, due)
        guarded, found = guard_text(answer, due, meta.get("risk"))
        t.contradictions += found is not None
        # After the guard: a reassurance still standing before the escalation sentence.
        _, still = guard_text(guarded.split(due, 1)[0], due, meta.get("risk"))
        t.contradictions_after_guard += still is not None
    else:
        t.not_due += 1
        t.false_escalations += any(carries(answer, s) for s in ESCALATIONS)


def mcq_tokens(engine: Engine, item: dict[str, Any]) -> tuple[list[int], list[list[int]], int]:
    """(prompt ids, each option's ids as the assistant's whole answer, the right option's
    index) of a multiple-choice item: what is scored, by edged and by tools that compare."""
    prompt = engine.render_chat([{"role": "user", "content": mcq_user_message(item)}], False)
    letters = list(item["options"])
    end = engine.tokenizer.encode("<|im_end|>")
    options = [
        engine.tokenizer.encode(mcq_answer(k, str(item["options"][k]))) + end for k in letters
    ]
    return prompt, options, letters.index(item["answer"])


def _mcq(engine: Engine, row: Row, t: Tally) -> None:
    prompt, options, right = mcq_tokens(engine, row.data)
    scores = [
        token_logprobs(logits, option)
        for logits, option in zip(engine.logits_for(prompt, options), options, strict=True)
    ]
    t.mcq_items += 1
    t.mcq_right += best_option([float(s.sum()) for s in scores]) == right
    t.mcq_right_norm += best_option([float(s.mean()) for s in scores]) == right


def _text(engine: Engine, reference: Engine | None, row: Row, t: Tally) -> None:
    ids = engine.tokenizer.encode(row.data["text"])
    if len(ids) < 2:
        return
    _score(engine, reference, ids[:1], ids[1:], t)
    t.texts += 1


def evaluate(
    engine: Engine,
    rows: Iterable[Row],
    reference: Engine | None = None,
    opts: EvalOptions | None = None,
) -> Tally:
    opts = opts or EvalOptions()
    t = Tally()
    for row in rows:
        if row.kind == "dialogue":
            _dialogue(engine, reference, row, opts, t)
        elif row.kind == "mcq":
            _mcq(engine, row, t)
        else:
            _text(engine, reference, row, t)
    return t


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def report(
    engine: Engine,
    t: Tally,
    data: Sequence[Path],
    reference: Engine | None,
    seconds: float,
) -> dict[str, Any]:
    """The evaluation as JSON-ready data; every metric null when its rows were absent."""
    m = engine.manifest
    return {
        "model": {"name": m.name, "dir": str(engine.model_dir), "quant": m.quantization.method},
        "reference": None if reference is None else str(reference.model_dir),
        "data": [str(p) for p in data],
        "perplexity": {
            "value": round(perplexity(t.nll, t.tokens), 4) if t.tokens else None,
            "tokens": t.tokens,
            "texts": t.texts,
        },
        "mcq": {
            "accuracy": _ratio(t.mcq_right, t.mcq_items),
            "accuracy_norm": _ratio(t.mcq_right_norm, t.mcq_items),
            "items": t.mcq_items,
        },
        "agreement": {
            "top1": _ratio(t.agree, t.positions),
            "mean_kl": round(t.kl / t.positions, 6) if t.positions else None,
            "positions": t.positions,
        },
        "dialogue": {
            "generated": t.generated,
            "cites_abnormal": _ratio(t.cited, t.cite_items),
            "news2_right": _ratio(t.news2_right, t.scored),
            "escalation_when_due": _ratio(t.escalated, t.due),
            "escalation_when_not_due": _ratio(t.false_escalations, t.not_due),
            "contradiction_rate": _ratio(t.contradictions, t.due),
            "contradiction_after_guard": _ratio(t.contradictions_after_guard, t.due),
            "due": t.due,
            "examples": t.examples,
        },
        "seconds": round(seconds, 1),
    }


def _progress(rows: Sequence[Row], started: float) -> Iterable[Row]:
    """The rows, with a line on stderr every 5 % (long runs: thousands of forward passes)."""
    step = max(1, len(rows) // 20)
    for i, row in enumerate(rows, 1):
        yield row
        if i % step == 0 or i == len(rows):
            elapsed = time.monotonic() - started
            print(f"eval: {i}/{len(rows)} rows, {elapsed:.0f} s", file=sys.stderr, flush=True)


def run(
    engine: Engine,
    rows: Sequence[Row],
    data: Sequence[Path],
    reference: Engine | None = None,
    opts: EvalOptions | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    started = time.monotonic()
    items: Iterable[Row] = _progress(rows, started) if progress else rows
    t = evaluate(engine, items, reference, opts)
    return report(engine, t, data, reference, time.monotonic() - started)
