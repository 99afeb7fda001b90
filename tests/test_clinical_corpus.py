"""tools/make_clinical_corpus.py: the demo model's dialogues say what edged's triage says."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from edged.clinical.advice import escalation
from edged.clinical.triage import assess
from edged.config.models import ClinicalConfig
from edged.eval.checks import carries, cites_all, states_news2
from edged.eval.datasets import DATA_DIR, DEFAULT_FILES, load
from tests._models import load_tool

REPO = Path(__file__).resolve().parent.parent


corpus = load_tool("make_clinical_corpus")
CFG = ClinicalConfig()


def _dialogues(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    return [corpus.dialogue(rng) for _ in range(n)]


def test_every_answer_cites_the_abnormal_values_and_escalates_exactly_when_due() -> None:
    for d in _dialogues(400):
        answer = d["messages"][-1]["content"].split("</think>")[-1]
        meta = d["meta"]
        assert cites_all(answer, meta["cite"]), (answer, meta["cite"])
        due = meta["escalation"]
        assert (due is not None and carries(answer, due)) or (
            due is None and not any(carries(answer, s) for s in CFG.escalation.values())
        ), answer
        if meta["news2"] is not None:  # the NEWS2 edged computed, as the harness reads it
            assert states_news2(answer, meta["news2"]), answer


def test_the_meta_is_edged_own_triage_of_the_window() -> None:
    rng = random.Random(3)
    for scenario in corpus.SCENARIOS:
        window = corpus.make_window(rng, scenario)
        triage = assess(window, CFG.red_flags)
        found = corpus.findings(window, triage)
        assert (escalation(triage, CFG) is not None) == bool(
            triage.red_flags or triage.news2.risk in ("medium", "high")
        )
        if triage.news2.score:
            assert found, (scenario.name, triage.news2.components)


def test_the_scenarios_cover_every_risk_band_and_the_wording_varies() -> None:
    rows = _dialogues(600)
    risks = {d["meta"]["risk"] for d in rows}
    assert {"low", "low_medium", "medium", "high", None} <= risks
    answers = [d["messages"][-1]["content"].split("</think>")[-1] for d in rows]
    openings = {a.split(".")[1][:25] for a in answers if a.count(".") > 2}
    assert len(openings) > 20
    assert sum("<think>\n\n</think>" in d["messages"][-1]["content"] for d in rows) < len(rows)


def test_mcq_answers_are_right_and_balanced(tmp_path: Path) -> None:
    rng = random.Random(11)
    items = [corpus.mcq(rng) for _ in range(300)]
    for item in items:
        assert item["options"][item["answer"]] == item["answer_text"]
        assert len(item["options"]) == 5 and "Early-warning score" not in item["question"]
    answers = [i["answer_text"] for i in items]
    most_common = max(answers.count(a) for a in set(answers))
    assert most_common / len(items) < 0.4  # always guessing one answer is near chance


def test_splits_are_written_deterministically(tmp_path: Path) -> None:
    counts = corpus.build(tmp_path / "a", 20, 5, 5, 5)
    corpus.build(tmp_path / "b", 20, 5, 5, 5)
    assert counts == {"train": 20, "heldout": 5, "mcq_train": 5, "mcq_test": 5}
    for name in ("train", "heldout", "mcq_train", "mcq_test"):
        a = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_text()
    train = {json.dumps(json.loads(x)["messages"]) for x in (tmp_path / "a/train.jsonl").open()}
    held = {json.dumps(json.loads(x)["messages"]) for x in (tmp_path / "a/heldout.jsonl").open()}
    assert not train & held


def test_the_bundled_eval_set_is_the_held_out_splits_first_rows(tmp_path: Path) -> None:
    corpus.write_eval_set(tmp_path, 150, 200, 32)
    for bundled in (*DEFAULT_FILES, DATA_DIR / "calibration.jsonl"):
        assert (tmp_path / bundled.name).read_text() == bundled.read_text(), bundled.name
    kinds = {r.kind for r in load(list(DEFAULT_FILES))}
    assert kinds == {"dialogue", "mcq"}
    # Calibration text comes from the training split, never from the scored one.
    corpus.build(tmp_path / "splits", 32, 150, 0, 0)
    train = (tmp_path / "splits" / "train.jsonl").read_text().splitlines()
    calibration = (DATA_DIR / "calibration.jsonl").read_text().splitlines()
    assert calibration == train
    assert not set(calibration) & set((DATA_DIR / "heldout.jsonl").read_text().splitlines())


@pytest.mark.parametrize("value", ["89", "38.4"])
def test_a_cited_value_must_stand_alone(value: str) -> None:
    assert cites_all(f"Your reading is {value} today.", [value])
    assert not cites_all(f"Your reading is 1{value}0 today.", [value])
    assert re.search(r"\d", value)
