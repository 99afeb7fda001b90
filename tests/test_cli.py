"""The command line as a new user meets it: exit statuses that scripts can trust, and output
that survives a pipe."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("where", ["a-file", "a-file/below"], ids=["is-a-file", "under-a-file"])
def test_a_state_dir_that_cannot_be_used_is_one_line_from_config_check(
    tmp_path: Path, where: str
) -> None:
    """`edged run` serves degraded on it instead (tests/test_degraded_store.py)."""
    (tmp_path / "a-file").write_text("not a directory\n")
    path = tmp_path / "edged.yaml"
    model = REPO / "edged/models/tiny-qwen3-int4"
    path.write_text(f"model: {{path: {model}}}\ndelivery:\n  state_dir: {tmp_path / where}\n")
    out = _edged("config", "check", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"{path}:3: delivery.state_dir = '{tmp_path / where}'"), line


def test_a_state_dir_that_does_not_exist_yet_passes_check_without_being_created(
    tmp_path: Path,
) -> None:
    path = tmp_path / "edged.yaml"
    model = REPO / "edged/models/tiny-qwen3-int4"
    path.write_text(f"model: {{path: {model}}}\ndelivery: {{state_dir: {tmp_path}/new/state}}\n")
    out = _edged("config", "check", str(path))
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "new").exists()


def _readme_console(after: str) -> list[str]:
    """The first ```console block after the line starting with `after` in the README."""
    text = (REPO / "README.md").read_text()
    start = text.index("```console", text.index(after))
    return text[start:].split("```")[1].splitlines()[1:]


def test_the_readme_config_examples_print_what_they_say(tmp_path: Path) -> None:
    """Each `$ command` of the README's config block, run as written (from a directory with the
    repository's config/ and an edged model at m/), prints the lines shown under it."""
    lines = _readme_console("`config/edged.yaml` lists every key")
    (tmp_path / "config").symlink_to(REPO / "config")
    (tmp_path / "m").symlink_to(REPO / "edged/models/tiny-qwen3-int4")
    (tmp_path / "edged").symlink_to(REPO / "edged")
    blocks: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            blocks.append((line[2:].split("  #")[0], []))
        elif line != "…":
            blocks[-1][1].append(line)
    assert len(blocks) == 4
    for command, shown in blocks:
        out = subprocess.run(
            ["bash", "-c", f"PATH={Path(sys.executable).parent}:$PATH; {command}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        printed = (out.stdout + out.stderr).splitlines()
        for expected in shown:
            assert expected in printed, f"{command!r} did not print {expected!r}: {printed}"
