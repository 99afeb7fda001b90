"""Evaluation data: JSONL files whose rows say what they are by their keys.

* a **dialogue**: `{"messages": [...], "meta": {...}}` (tools/make_clinical_corpus.py): its
  last message is the assistant's reference answer; `meta.cite` lists the abnormal values an
  answer should quote and `meta.escalation` the sentence due (or null);
* a **multiple-choice item**, MedQA-style: `{"question", "options": {"A": ..., "E": ...},
  "answer": "C"}`;
* plain **text**: `{"text": ...}`, scored as a whole.

The default set ships with edged (`edged/eval/data/`): held-out dialogues and MCQ items from
seeds the demo model was never trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_FILES = (DATA_DIR / "heldout.jsonl", DATA_DIR / "mcq.jsonl")

RowKind = Literal["dialogue", "mcq", "text"]


class EvalDataError(Exception):
    """A data file that cannot be evaluated; the message names the file, the line and why."""


@dataclass(frozen=True)
class Row:
    kind: RowKind
    data: dict[str, Any]
    where: str
    """`file:line`, for messages."""


def row_kind(data: Any, where: str) -> RowKind:
    if not isinstance(data, dict):
        raise EvalDataError(f"{where}: a row must be a JSON object")
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise EvalDataError(f"{where}: messages must be a list of at least two turns")
        if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise EvalDataError(f"{where}: the last message must be the assistant's answer")
        return "dialogue"
    if {"question", "options", "answer"} <= data.keys():
        options = data["options"]
        if not isinstance(options, dict) or data["answer"] not in options:
            raise EvalDataError(f"{where}: answer {data['answer']!r} is not one of the options")
        return "mcq"
    if isinstance(data.get("text"), str):
        return "text"
    raise EvalDataError(
        f"{where}: a row needs messages (a dialogue), question/options/answer (multiple "
        "choice) or text"
    )


def load(paths: list[Path]) -> list[Row]:
    rows: list[Row] = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise EvalDataError(f"{path}: cannot read: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{where}: not JSON: {exc.msg}") from None
            rows.append(Row(row_kind(data, where), data, where))
    if not rows:
        raise EvalDataError(f"no rows in {', '.join(map(str, paths))}")
    return rows


MCQ_INSTRUCTION = "Answer with one option."


def mcq_user_message(item: dict[str, Any]) -> str:
    """The user turn of a multiple-choice item: the question, its options, the instruction
    (the demo model was trained on this very format)."""
    options = "\n".join(f"{letter}. {text}" for letter, text in item["options"].items())
    return f"{item['question']}\n{options}\n{MCQ_INSTRUCTION}"


def mcq_answer(letter: str, text: str) -> str:
    """An option as the assistant would answer it."""
    return f"{letter}. {text}"
