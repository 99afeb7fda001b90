"""tools/install.sh against a temporary root (DESTDIR), never the real system."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "install.sh"


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed")
def test_install_lays_out_files_enables_the_unit_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = dict(os.environ, DESTDIR=str(root), EDGED_SKIP_PIP="1")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60
        )

    first = run()
    assert first.returncode == 0, first.stderr
    unit = root / "etc/systemd/system/edged.service"
    config = root / "etc/edged/edged.yaml"
    password = root / "etc/edged/mqtt-password"
    assert (
        "ExecStart=/opt/edged/venv/bin/edged run --config /etc/edged/edged.yaml" in unit.read_text()
    )
    assert "path: /opt/edged/models/default" in config.read_text()
    assert password.stat().st_mode & 0o777 == 0o600
    wants = root / "etc/systemd/system/multi-user.target.wants/edged.service"
    assert wants.is_symlink()

    config.write_text("# edited by the operator\n")
    password.write_text("secret\n")
    second = run()
    assert second.returncode == 0, second.stderr
    assert config.read_text() == "# edited by the operator\n", "config is never overwritten"
    assert password.read_text() == "secret\n"
    assert "keeping existing /etc/edged/edged.yaml" in second.stdout
    assert wants.is_symlink()


def _run_script(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    # No EDGED_SKIP_PIP: a dry run must not create the venv or run pip either.
    env = {k: v for k, v in os.environ.items() if k != "EDGED_SKIP_PIP"}
    env["DESTDIR"] = str(root)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_touches_nothing(tmp_path: Path, flag: str) -> None:
    root = tmp_path / "root"

    result = _run_script(flag, root=root)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tools/install.sh")
    assert "--dry-run" in result.stdout and "DESTDIR" in result.stdout
    assert not root.exists()


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"

    result = _run_script("--dry-run", root=root)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"would run: install -d -m 0755 {root}/opt/edged" in out
    assert f"would run: python3 -m venv {root}/opt/edged/venv" in out
    assert f"{root}/opt/edged/venv/bin/python -m pip install" in out
    assert f"would write: {root}/etc/edged/edged.yaml" in out
    assert f"would write: {root}/etc/systemd/system/edged.service" in out
    assert f"would run: systemctl --root={root} enable edged.service" in out
    assert not root.exists(), "a dry run must not create anything"


def test_unknown_option_prints_usage_on_stderr_and_exits_2(tmp_path: Path) -> None:
    root = tmp_path / "root"

    result = _run_script("--frobnicate", root=root)

    assert result.returncode == 2
    assert "unknown option --frobnicate" in result.stderr
    assert "usage: tools/install.sh" in result.stderr
    assert result.stdout == ""
    assert not root.exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_announces_the_long_first_install_and_lets_pip_show_progress(
    tmp_path: Path,
) -> None:
    venv = tmp_path / "venv"
    # -n: print the recipe, run nothing; a fresh VENV makes every install step due.
    result = subprocess.run(
        ["make", "-n", "-C", str(REPO), f"VENV={venv}", "install-dev"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    heavy = next(
        i for i, line in enumerate(lines) if "pip install" in line and "[export,dev]" in line
    )
    assert any("about 1-2 minutes" in line for line in lines[:heavy]), result.stdout
    assert "--quiet" not in lines[heavy] and "--progress-bar on" in lines[heavy]
    assert not venv.exists()
