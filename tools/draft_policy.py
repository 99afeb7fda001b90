#!/usr/bin/env python3
"""Compare drafting policies for speculative decoding offline, on the demo model's answers.

With greedy decoding the answer does not depend on how it was drafted: speculation changes
how many tokens a forward pass yields, never which. So the demo model answers each held-out
question once, and any `DraftSettings` can then be replayed over those answers without the
model: at each pass edged's own `PromptLookup` proposes, the draft is accepted up to its
first token that differs from the answer, and `DraftLength` decides the next draft's length.
The replay of the settings the answers were generated with reproduces the engine's recorded
trace pass for pass (checked at every run, and by tests/test_draft_policy.py), so what it
says of other settings is what the engine would do with them, on these answers.

It reports tokens per verification pass and acceptance: the counts, free of this machine's
noise. What a pass costs depends on the model and the CPU (tools/bench_spec.py measures
speed end to end); a pass of more rows costs more, so of two settings with equal tokens per
pass, the one drafting fewer tokens is faster.

    python tools/draft_policy.py                         # the default against min_ngram 1
    python tools/draft_policy.py --dialogues 120 --offset 30 min_ngram=2,max_ngram=6
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from edged.engine.draft import (
    AnswerWindow,
    DraftLength,
    DraftSettings,
    NgramCounts,
    PromptLookup,
    draft_room,
    phrase_counts,
)


@dataclass(frozen=True)
class Answer:
    prompt: list[int]
    tokens: list[int]
    """The answer's token ids as generated (greedy), EOS included when it ended there."""
    trace: list[tuple[int, int]]
    """(drafted, accepted) per decode pass, as the engine recorded it."""


@dataclass(frozen=True)
class Limits:
    """What bounds a draft besides the policy: the generation's token cap, the KV capacity."""

    max_new_tokens: int
    capacity: int
    eos: frozenset[int]


def replay_answer(
    answer: Answer,
    sources: Sequence[NgramCounts],
    settings: DraftSettings,
    limits: Limits,
) -> list[tuple[int, int]]:
    """The (drafted, accepted) trace `settings` would give while writing `answer.tokens`,
    drafting from its prompt and `sources` (the phrases, the earlier answers), as edged's
    decode loop does (generate.py, `_DecodeLoop`)."""
    tokens, prompt = answer.tokens, answer.prompt
    max_new = min(limits.max_new_tokens, limits.capacity - len(prompt))
    lookup = PromptLookup(prompt, sources, settings)
    policy = DraftLength(settings)
    trace: list[tuple[int, int]] = []
    taken = 0

    def take(token: int) -> bool:
        nonlocal taken
        lookup.append(token)
        taken += 1
        return token in limits.eos or taken >= max_new

    done = take(tokens[0])
    while not done:
        # The runner holds the prompt and every token but the last taken one.
        room = draft_room(limits.capacity, len(prompt) + taken - 1, max_new, taken)
        drafts = lookup.propose(min(room, policy.allowance())) if room >= 1 else []
        accepted = 0
        for draft in drafts:
            if taken >= len(tokens) or draft != tokens[taken]:
                break
            accepted += 1
            if take(draft):
                done = True
                break
        if drafts:
            policy.record(len(drafts), accepted)
        trace.append((len(drafts), accepted))
        if not done:
            done = take(tokens[taken])
    return trace


def replay(
    answers: Sequence[Answer],
    phrases: Sequence[Sequence[int]],
    settings: DraftSettings,
    limits: Limits,
) -> list[list[tuple[int, int]]]:
    """Every answer's trace under `settings`, in order, each answer then kept among the
    earlier ones drafted from (the engine's window of `recent_answers`)."""
    sources = [phrase_counts(phrases, settings)]
    recent = AnswerWindow(settings)
    traces = []
    for answer in answers:
        traces.append(replay_answer(answer, [*sources, recent.counts], settings, limits))
        recent.add(answer.tokens)
    return traces


def summary(traces: Sequence[Sequence[tuple[int, int]]]) -> dict[str, float]:
    passes = [p for trace in traces for p in trace]
    drafted = sum(d for d, _ in passes)
    accepted = sum(a for _, a in passes)
    return {
        "passes": len(passes),
        "tokens_per_pass": (len(passes) + accepted) / max(1, len(passes)),
        "drafted_per_pass": drafted / max(1, len(passes)),
        "acceptance": accepted / max(1, drafted),
    }


def record(
    dialogues: int, offset: int, settings: DraftSettings
) -> tuple[list[Answer], list[list[int]], Limits]:
    """The demo model's answers to held-out questions (as the daemon asks them, with edged's
    draft phrases), generated with `settings`; the phrases' token ids; the limits used."""
    from edged.config.models import ClinicalConfig
    from edged.engine import Engine, EngineOptions, GenerationConfig
    from edged.eval.datasets import DEFAULT_FILES, load
    from edged.models import DEMO_MODEL
    from edged.service.worker import draft_phrases

    limits_new, capacity = 200, 1024
    engine = Engine.load(
        DEMO_MODEL, EngineOptions(threads=1, context_length=capacity, speculation=settings)
    )
    if engine.options.speculation is None:
        raise SystemExit(f"speculation is off on this CPU ({engine.speculation_checked})")
    phrases = draft_phrases(ClinicalConfig())
    config = GenerationConfig(max_new_tokens=limits_new, draft_phrases=phrases, trace_drafts=True)
    rows = load([DEFAULT_FILES[0]])[offset : offset + dialogues]
    answers = []
    for row in rows:
        prompt = engine.render_chat(row.data["messages"][:2], enable_thinking=False)
        result = engine.generate(prompt, config)
        trace = result.speculation.trace if result.speculation else None
        answers.append(Answer(list(prompt), list(result.token_ids), list(trace or [])))
    phrase_ids = [engine.phrase_ids(p) for p in phrases]
    return answers, phrase_ids, Limits(limits_new, capacity, frozenset(engine.eos_ids))


def parse_settings(text: str) -> DraftSettings:
    """`min_ngram=2,min_share=0.6` over the defaults; an unknown name or a bad value is an
    error."""
    kinds = {f.name: type(getattr(DraftSettings(), f.name)) for f in fields(DraftSettings)}
    changes: dict[str, Any] = {}  # each of its field's own type, int or float
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            changes[name] = kinds[name](value)
        except (KeyError, ValueError):
            raise ValueError(
                f"{item!r}: expected NAME=NUMBER, NAME one of {', '.join(kinds)}"
            ) from None
    return replace(DraftSettings(), **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="*", help="NAME=VALUE,... over DraftSettings' defaults")
    parser.add_argument("--dialogues", type=int, default=30, help="held-out questions (30)")
    parser.add_argument("--offset", type=int, default=0, help="first question (0)")
    args = parser.parse_args(argv)
    texts = args.settings or ["", "min_ngram=1"]
    try:
        candidates = [parse_settings(s) for s in texts]
    except ValueError as exc:
        parser.error(str(exc))
    answers, phrases, limits = record(args.dialogues, args.offset, candidates[0])
    if replay(answers, phrases, candidates[0], limits) != [a.trace for a in answers]:
        print("the replay does not reproduce the engine's trace: not comparable", file=sys.stderr)
        return 1
    tokens = sum(len(a.tokens) for a in answers)
    print(f"{len(answers)} answers, {tokens} tokens; the replay reproduces the engine's trace")
    print(f"{'settings':40s} {'passes':>7s} {'tok/pass':>8s} {'drafted/pass':>12s} {'accept':>7s}")
    for text, settings in zip(texts, candidates, strict=True):
        s = summary(replay(answers, phrases, settings, limits))
        print(
            f"{text or '(defaults)':40s} {s['passes']:7d} {s['tokens_per_pass']:8.3f} "
            f"{s['drafted_per_pass']:12.3f} {s['acceptance']:7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
