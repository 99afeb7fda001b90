"""`edged model eval`: the harness's mechanics on the tiny random model, its numbers on the
demo model trained here, and its data errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.eval.checks import cites, states_news2
from edged.eval.datasets import DEFAULT_FILES, EvalDataError, load
from edged.eval.harness import EvalOptions, run, split_chat
from edged.eval.scoring import kl_divergence, perplexity, token_logprobs, top1_agreement
from edged.models import DEMO_MODEL, TINY_QWEN3_INT4

TINY = Engine.load(TINY_QWEN3_INT4, EngineOptions(threads=1, context_length=1024))


def test_teacher_forced_logits_follow_greedy_generation() -> None:
    prompt = TINY.render_chat([{"role": "user", "content": "My pulse is 118 at rest."}])
    result = TINY.generate(prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    (logits,) = TINY.logits_for(prompt, [list(result.token_ids)])
    assert logits.shape == (12, TINY.tokenizer.vocab_size) or logits.shape[0] == 12
    # Greedy picked each token as the argmax of exactly these rows.
    assert logits.argmax(-1).tolist() == list(result.token_ids)


def test_one_prefill_serves_every_continuation() -> None:
    prompt = TINY.render_chat([{"role": "user", "content": "Am I ok?"}])
    a, b, empty = TINY.logits_for(prompt, [[5, 6, 7], [5, 9], []])
    assert np.array_equal(a[:1], b[:1])  # both first rows follow the same prompt
    assert a.shape[0] == 3 and b.shape[0] == 2 and empty.shape[0] == 0
    (again,) = TINY.logits_for(prompt, [[5, 9]])
    assert np.allclose(again, b, atol=1e-5)


def test_scoring_functions() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert token_logprobs(logits, [0, 2]) == pytest.approx(np.log([0.7, 0.8]))
    assert perplexity(-float(np.log([0.7, 0.8]).sum()), 2) == pytest.approx((0.7 * 0.8) ** -0.5)
    assert top1_agreement(logits, logits[::-1]) == 0 and top1_agreement(logits, logits) == 2
    assert kl_divergence(logits, logits) == pytest.approx([0, 0])
    assert (kl_divergence(logits, logits[::-1]) > 0).all()
    with pytest.raises(ValueError, match="3 tokens but 2 rows"):
        token_logprobs(logits, [0, 1, 2])


@pytest.mark.parametrize(
    ("answer", "value", "expected"),
    [
        ("SpO2 89 % now", "89", True),
        ("heart rate 189 /min", "89", False),  # inside a longer number
        ("temperature 38.45 °C", "38.4", False),
        ("temperature 38.4 °C.", "38.4", True),
        ("no numbers at all", "89", False),
    ],
)
def test_an_answer_cites_a_value_only_as_a_number_of_its_own(
    answer: str, value: str, expected: bool
) -> None:
    assert cites(answer, value) is expected


def test_the_stated_score_must_be_the_triages_and_only_it() -> None:
    assert states_news2("Your early-warning score is NEWS2 5, medium risk.", 5)
    # The corpus's other two sentences (risk_sentence) state it as well.
    assert states_news2("NEWS2 is 5, which means medium risk.", 5)
    assert states_news2("The early-warning score (NEWS2) is 5: medium risk.", 5)
    assert not states_news2("NEWS2 is 3, which means low risk.", 5)
    assert not states_news2("Your early-warning score is NEWS2 3, low risk.", 8)
    assert not states_news2("NEWS2 5 now, NEWS2 2 before.", 5)  # a second, wrong score
    assert not states_news2("Your readings are high.", 5)  # no score stated


def test_the_tiny_model_against_itself_agrees_everywhere() -> None:
    rows = load([DEFAULT_FILES[0]])[:3] + load([DEFAULT_FILES[1]])[:4]
    report = run(
        TINY, rows, list(DEFAULT_FILES), reference=TINY, opts=EvalOptions(max_new_tokens=8)
    )
    assert report["agreement"]["top1"] == 1.0 and report["agreement"]["mean_kl"] == 0.0
    assert report["perplexity"]["texts"] == 3 and report["perplexity"]["value"] > 1
    assert report["mcq"]["items"] == 4 and report["dialogue"]["generated"] == 3
    assert report["perplexity"]["tokens"] == sum(
        len(split_chat(TINY, r.data["messages"])[1]) for r in rows[:3]
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "at least two turns"),
        ('{"question": "q", "options": {"A": "x"}, "answer": "B"}', "'B' is not one of"),
        ('{"nothing": 1}', "a row needs messages"),
    ],
)
def test_bad_data_is_refused_naming_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(EvalDataError, match=f"data.jsonl:2: .*{message}"):
        load([path])


def test_the_demo_model_scores_in_a_sane_range(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edged",
            "model",
            "eval",
            str(DEMO_MODEL),
            "--limit",
            "60",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    # Measured on the whole bundled set when the model was committed: perplexity 1.052, MCQ
    # 75.5 %, abnormal values all quoted exactly in 95.0 % of answers and the NEWS2 score in
    # 100 %, escalation 98.6 % when due and 0 % when not, no contradiction before the guard.
    # The bounds leave room for another CPU's int4 kernels changing a few greedy tokens, not
    # for a broken model or harness.
    assert 1.0 < report["perplexity"]["value"] < 1.3
    assert report["mcq"]["accuracy"] > 0.5  # chance is 0.2 (five options, balanced answers)
    d = report["dialogue"]
    assert d["cites_abnormal"] > 0.85 and d["news2_right"] > 0.85
    assert d["escalation_when_due"] > 0.8 and d["escalation_when_not_due"] < 0.1
    assert d["contradiction_after_guard"] == 0.0
    assert "perplexity" in done.stdout and "MCQ" in done.stdout
