"""The bundled demo model: labelled honestly, exported reproducibly from the committed
checkpoint, and what `edged ask` and the daemon make of it reads as advice with the wearer's
numbers in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edged.engine.manifest import load_manifest, read_manifest
from edged.models import DEMO_MODEL
from tests._models import REPO_ROOT, export_deps_missing, load_tool

CHECKPOINT = REPO_ROOT / "tests" / "fixtures" / "demo-clinical-hf"
NOT_MEDICAL = "demo model trained on synthetic dialogues; not a medical model"


def test_the_demo_model_says_what_it_is_and_its_files_match() -> None:
    manifest = load_manifest(DEMO_MODEL, verify=True)
    assert manifest.description is not None and NOT_MEDICAL in manifest.description
    # Exported with the exporter's defaults: int4 in blocks of 32, the LM head at 8 bits.
    q = manifest.quantization
    assert (q.method, q.block_size, q.lm_head_bits) == ("int4", 32, 8)
    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir())
    assert size < 15 * 2**20
    info = subprocess.run(
        [sys.executable, "-m", "edged", "model", "info", str(DEMO_MODEL)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0 and NOT_MEDICAL in info.stdout


@pytest.mark.arm64
def test_an_answer_reads_as_advice_and_quotes_the_wearers_numbers() -> None:
    ask = subprocess.run(
        [
            sys.executable,
            "-m",
            "edged",
            "ask",
            "--model",
            str(DEMO_MODEL),
            "--vitals",
            # Two summaries as a gateway sends them (heart rate with its minute's range).
            '[{"spo2": 92, "resp_rate": 22, "heart_rate": {"mean": 104, "min": 98, "max": 110}},'
            ' {"spo2": 88, "resp_rate": 25, "heart_rate": {"mean": 112, "min": 104, "max": 118}}]',
            "--max-tokens",
            "120",
            "I am short of breath. What should I do?",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ask.returncode == 0, ask.stderr
    answer = ask.stdout.strip()
    # Sentences of advice about this wearer's readings: a vital named with a number, the score.
    assert len(answer.split()) > 12 and answer[0].isupper() and answer.endswith(".")
    assert re.search(r"(SpO2|respiration|heart rate)[^.;]*?\d", answer) and "NEWS2" in answer
    # Every number in it is the wearer's own (or the triage's score): quoted, not made up.
    wearers = {92, 22, 98, 110, 88, 25, 104, 112, 118}
    numbers = {int(n) for n in re.findall(r"(?<![\w.])\d+(?![\w.])", answer)}
    assert numbers - {8} <= wearers and len(numbers & wearers) >= 2, answer
    # The triage is high whatever the model wrote: the guard's escalation is attached.
    assert "NEWS2 8, high risk" in ask.stderr and "escalation (attached" in ask.stderr


@pytest.mark.export
@pytest.mark.skipif(export_deps_missing() is not None, reason=str(export_deps_missing()))
def test_the_export_from_the_committed_checkpoint_is_reproducible(tmp_path: Path) -> None:
    train = load_tool("train_demo_model")
    rebuilt = train.export(CHECKPOINT, tmp_path / "demo")
    committed = read_manifest(DEMO_MODEL)
    if rebuilt.tools != committed.tools:
        pytest.skip(f"committed with {committed.tools}, this environment has {rebuilt.tools}")
    assert rebuilt.files == committed.files, (
        "the committed demo model is stale: python tools/train_demo_model.py --export-only "
        "--checkpoint tests/fixtures/demo-clinical-hf --export edged/models/demo-clinical-int4"
    )
