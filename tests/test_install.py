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
