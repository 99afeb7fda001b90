"""The command line as a new user meets it: exit statuses that scripts can trust, and output
that survives a pipe."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from edged.models import TINY_QWEN3_INT4

REPO = Path(__file__).resolve().parent.parent


def _edged(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_model_info_exits_1_when_a_file_does_not_match_its_hash(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(TINY_QWEN3_INT4, model)
    assert _edged("model", "info", str(model)).returncode == 0
    with (model / "generation_config.json").open("a") as f:
        f.write("\n")  # one byte more: what a truncated copy or a bad SD card does
    for extra in ((), ("--json",)):
        out = _edged("model", "info", str(model), *extra)
        assert out.returncode == 1, out.stderr
        assert "FAILED" in out.stdout and "generation_config.json" in out.stdout


def test_model_info_into_a_pipe_that_closes_early_is_quiet() -> None:
    # `edged model info DIR | head -1` on a long listing, made certain: `true` reads nothing and
    # has exited long before the model is loaded, so every write meets a closed pipe.
    shell = f"{sys.executable} -m edged model info {TINY_QWEN3_INT4} | true"
    out = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr


def test_the_demo_shows_readable_advice_and_says_what_the_model_is() -> None:
    """`make demo`, the README's main job: a private broker, the daemon on the bundled demo
    model and simulated wearers; every question answered, advice as text, not a repr."""
    out = _edged("demo", "--seconds", "90", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert text.count("  advice   ") == 2 and "  error    invalid_json" in text
    assert "  alert    w-bob: " in text and "triage: NEWS2" in text
    assert "{'" not in text and "weights are random" not in text
    assert "not a medical model" in text  # the bundled model's manifest says what it is
    assert text.rstrip().endswith("stopped: daemon and broker")
