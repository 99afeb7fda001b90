"""Creating the onnxruntime-genai venv takes minutes: its slow pip steps must say they run."""

from __future__ import annotations

import sys

import pytest

from edged.export import genai_builder


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_slow_silent_step_says_it_is_still_running_and_relays_pips_news() -> None:
    said: list[str] = []
    slow = "import time; print('Collecting torch==2.13.0', flush=True); time.sleep(1.3)"

    genai_builder.run_reporting(_script(slow), "pip install", said.append, every_s=0.4)

    assert said[0] == "pip install: Collecting torch==2.13.0"
    beats = [line for line in said if "still running" in line]
    assert len(beats) >= 2, said
    assert beats[0].startswith("pip install: still running (")


def test_a_failing_step_raises_with_the_tail_of_its_output() -> None:
    said: list[str] = []
    failing = "import sys; print('ERROR: No matching distribution for torch'); sys.exit(3)"

    with pytest.raises(genai_builder.GenaiBuildError, match="exit 3") as info:
        genai_builder.run_reporting(_script(failing), "pip install", said.append, every_s=5)

    assert "No matching distribution for torch" in str(info.value)
