"""`edged config check`: one clear line per problem, exit code 2; the shipped config passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Config validation through the real CLI: part of the ARM subset (tools/arm64_check.sh).
pytestmark = pytest.mark.arm64


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.parametrize("name", ["edged.yaml", "fleet.example.yaml"])
def test_shipped_configs_pass(name: str) -> None:
    out = _check(REPO / "config" / name)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "mqtt:\n  prot: 1883\nmodel: {path: m}\n",
            ":2: mqtt.prot: unknown key; did you mean 'port'?",
        ),
        (
            "mqtt:\n  port: many\nmodel: {path: m}\n",
            ":2: mqtt.port = 'many': Input should be a valid integer",
        ),
        (
            "model:\n  path: m\n  threads: -2\n",
            ":3: model.threads = -2: Input should be greater than or equal to 0",
        ),
        ("mqtt: {host: x}\n", ": model: required key is missing"),
        ("mqtt: {port: 1883}\nmodel:\n  path: no-such-dir\n", ":3: model.path = '"),
        (
            f"model: {{path: {REPO / 'edged/models/tiny-qwen3-int4'}}}\nmqtt:\n"
            "  password_file: /nonexistent/pw\n",
            ":3: mqtt.password_file = '/nonexistent/pw': cannot be read",
        ),
        (
            "clinical:\n  red_flags:\n    severities: {sneezing: high}\nmodel: {path: m}\n",
            "unknown flag(s) sneezing",
        ),
        ("model: [1, 2\n", "not valid YAML"),
        (
            "model: {path: m}\ngovernor:\n  warm_c: 80\n",
            ":2: governor: warm_c, hot_c and critical_c must be given together",
        ),
        (
            "model: {path: m}\ngovernor: {warm_c: 80, hot_c: 75, critical_c: 90}\n",
            ":2: governor: bands must rise: warm_c = 80.0, hot_c = 75.0",
        ),
    ],
    ids=[
        "typo",
        "string-for-number",
        "negative-threads",
        "no-model",
        "missing-model-dir",
        "unreadable-password-file",
        "unknown-red-flag",
        "broken-yaml",
        "one-band-alone",
        "bands-not-rising",
    ],
)
def test_broken_configs_exit_2_with_one_line_naming_file_and_key(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text(yaml_text)
    out = _check(path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(str(path)) and expected in lines[0], lines[0]
    assert "Traceback" not in out.stderr


def test_config_show_masks_the_password(tmp_path: Path) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text(
        f"mqtt: {{username: u, password: hunter2}}\nmodel: {{path: {REPO}/edged/"
        "models/tiny-qwen3-int4}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "edged", "config", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "password: '********'" in out.stdout
    assert "stall_timeout_s: 120.0" in out.stdout  # defaults are filled in


@pytest.mark.parametrize("where", ["a-file", "a-file/below"], ids=["is-a-file", "under-a-file"])
def test_a_state_dir_that_cannot_be_used_is_one_line_from_check_and_from_run(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    path = tmp_path / "edged.yaml"
    model = REPO / "edged/models/tiny-qwen3-int4"
    path.write_text(f"model: {{path: {model}}}\ndelivery:\n  state_dir: {tmp_path / where}\n")
    out = _check(path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"{path}:3: delivery.state_dir = '{tmp_path / where}'"), line
    # `edged run` stops before loading the model, with the same line and no traceback.
    run = subprocess.run(
        [sys.executable, "-m", "edged", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"edged: delivery.state_dir = '{tmp_path / where}'"
    ), run.stderr


def test_a_state_dir_that_does_not_exist_yet_passes_check_without_being_created(
    tmp_path: Path,
) -> None:
    path = tmp_path / "edged.yaml"
    model = REPO / "edged/models/tiny-qwen3-int4"
    path.write_text(f"model: {{path: {model}}}\ndelivery: {{state_dir: {tmp_path}/new/state}}\n")
    out = _check(path)
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
