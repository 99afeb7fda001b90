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
