"""The startup memory check refuses a model that cannot fit, with the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.config.loader import parse_config
from edged.governor.memory_check import ModelDoesNotFit, check_model_fits, memory_need
from edged.governor.sensors import read_all
from edged.service.model_loading import load_model
from tests._mqtt import MODEL, daemon_config


def _cgroup_root(tmp_path: Path, limit_bytes: int, usage_bytes: int) -> Path:
    """A cgroup v2 tree in the kernel's format, the daemon in system.slice/edged.service."""
    root = tmp_path / "root"
    group = root / "sys/fs/cgroup/system.slice/edged.service"
    group.mkdir(parents=True)
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/system.slice/edged.service\n")
    (group / "memory.max").write_text(f"{limit_bytes}\n")
    (group / "memory.high").write_text("max\n")
    (group / "memory.current").write_text(f"{usage_bytes}\n")
    (root / "proc/meminfo").write_text(
        "MemTotal:        8245032 kB\nMemFree:         6000000 kB\nMemAvailable:    7000000 kB\n"
    )
    return root


def test_need_counts_prepacked_weights_kv_and_runtime() -> None:
    need = memory_need(MODEL, context_length=2048)
    # tiny model: 2 layers x 2 x 2 KV heads x 16 x 4 bytes = 512 bytes per token
    assert need.kv_mb == pytest.approx(512 * 2048 / 2**20)
    assert 150 < need.total_mb < 160


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    readings = read_all(_cgroup_root(tmp_path, 120 * 2**20, 20 * 2**20))
    with pytest.raises(ModelDoesNotFit) as err:
        check_model_fits(MODEL, 2048, readings)
    message = str(err.value)
    assert "needs about 151 MB" in message and "may use 100 MB" in message
    assert "cgroup limit 120 MB, 20 MB in use" in message
    assert "model.context_length" in message


def test_a_model_that_fits_passes(tmp_path: Path) -> None:
    readings = read_all(_cgroup_root(tmp_path, 2048 * 2**20, 100 * 2**20))
    assert check_model_fits(MODEL, 2048, readings).total_mb < 200


def test_the_daemon_refuses_the_model_and_serves_degraded(tmp_path: Path) -> None:
    root = _cgroup_root(tmp_path, 120 * 2**20, 20 * 2**20)
    config = parse_config(daemon_config(1, tmp_path / "state", governor={"sensor_root": str(root)}))
    # Refused before loading, not OOM-killed while loading; the daemon then runs degraded.
    assert load_model(config) is None
