"""systemd/edged.service: it parses without a warning, stays hardened, keeps the notify contract.

systemd-analyze runs offline (nothing has to be booted); the tests that need it are skipped where
it is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edged.config.models import LimitsConfig

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD_DIR / "edged.service"
MEMORY_DROPIN_EXAMPLE = SYSTEMD_DIR / "edged.service.d" / "memory.conf.example"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.0
TIMEOUT_S = 30.0

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not on PATH (Debian package: systemd)"
)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in file order; keys may repeat (SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def values(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def seconds(timespan: str) -> float:
    """The systemd time spans this unit uses: `30`, `30s`, `5min`."""
    match = re.fullmatch(r"(\d+)\s*(s|sec|min)?", timespan)
    assert match, f"time span {timespan!r} is not N, Ns or Nmin"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    # SYSTEMD_LOG_LEVEL, SYSTEMD_UNIT_PATH and friends in a developer's shell would change what
    # systemd-analyze loads and prints; the test runs it as CI does.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names a binary that exists here: verify checks it, and
    /opt/edged/venv exists only on a device. Same arguments, same file name (security reports
    by unit name)."""
    text, count = re.subn(
        r"^ExecStart=/opt/edged/venv/bin/edged ",
        f"ExecStart={sys.executable} -m edged ",
        UNIT.read_text(),
        flags=re.MULTILINE,
    )
    assert count == 1, "ExecStart=/opt/edged/venv/bin/edged … not found exactly once"
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


@needs_systemd_analyze
def test_unit_verifies_without_a_single_warning(runnable_unit: Path) -> None:
    # verify exits 0 on "Unknown key … ignoring" and "Invalid syntax, ignoring", so stderr is the
    # verdict. Nothing is filtered: on Debian 12's systemd 252, offline, as root, a clean unit
    # prints nothing at all.
    result = systemd_analyze("verify", "--man=no", str(runnable_unit), cwd=runnable_unit.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_systemd_analyze
def test_memory_dropin_example_verifies_when_uncommented(runnable_unit: Path) -> None:
    # Both boards' lines at once: a later assignment overrides an earlier one, so the drop-in
    # stays valid and every value gets parsed.
    lines = [
        line[1:]
        for line in MEMORY_DROPIN_EXAMPLE.read_text().splitlines()
        if re.fullmatch(r"#(\[Service\]|Memory\w+=\S+)", line)
    ]
    assert sum(line.startswith("Memory") for line in lines) >= 4, lines
    dropin = runnable_unit.parent / f"{UNIT.name}.d" / "memory.conf"
    dropin.parent.mkdir()
    dropin.write_text("\n".join(lines) + "\n")
    result = systemd_analyze("verify", "--man=no", str(runnable_unit), cwd=runnable_unit.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_systemd_analyze
def test_security_exposure_is_at_most_2(runnable_unit: Path) -> None:
    result = systemd_analyze(
        "security", "--offline=true", "--no-pager", str(runnable_unit), cwd=runnable_unit.parent
    )
    assert result.returncode == 0, result.stderr
    # systemd 252: "→ Overall exposure level for edged.service: 1.2 OK 🙂" ("->" and ":-)"
    # outside a UTF-8 locale).
    match = re.search(r"Overall exposure level for edged\.service: (\d+\.\d+) (\S+)", result.stdout)
    assert match, f"no overall exposure line in:\n{result.stdout}"
    exposure = float(match[1])
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_unit_keeps_the_notify_watchdog_contract() -> None:
    unit = parse_unit(UNIT.read_text())
    assert values(unit, "Service", "Type") == ["notify"]
    assert values(unit, "Service", "NotifyAccess") == ["main"]
    (watchdog,) = values(unit, "Service", "WatchdogSec")
    assert seconds(watchdog) > 0
    assert values(unit, "Service", "Restart") == ["on-failure"]
    assert values(unit, "Service", "ExecStart") == [
        "/opt/edged/venv/bin/edged run --config /etc/edged/edged.yaml"
    ]


def test_start_limits_sit_in_unit_section_where_systemd_reads_them() -> None:
    unit = parse_unit(UNIT.read_text())
    for key in ("StartLimitIntervalSec", "StartLimitBurst"):
        assert len(values(unit, "Unit", key)) == 1, key
        assert not values(unit, "Service", key), f"{key} in [Service] is ignored"


def test_proc_stays_whole_for_psutil() -> None:
    # ProcSubset=pid hides /proc/meminfo and /proc/stat: psutil.virtual_memory() then fails.
    unit = parse_unit(UNIT.read_text())
    assert not any(key == "ProcSubset" for entries in unit.values() for key, _ in entries)


def test_stop_timeout_outlasts_the_default_drain() -> None:
    unit = parse_unit(UNIT.read_text())
    (stop_timeout,) = values(unit, "Service", "TimeoutStopSec")
    drain_s = LimitsConfig().drain_timeout_s
    assert seconds(stop_timeout) >= 2 * drain_s, (
        f"TimeoutStopSec={stop_timeout} leaves too little margin over drain_timeout_s={drain_s}"
    )


def test_broker_password_arrives_as_a_credential() -> None:
    unit = parse_unit(UNIT.read_text())
    assert values(unit, "Service", "LoadCredential") == ["mqtt-password:/etc/edged/mqtt-password"]
