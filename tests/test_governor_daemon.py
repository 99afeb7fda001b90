"""The governor inside the running daemon, driven by a fake thermal zone and cgroup in the
kernel's formats (this machine has neither), against a real mosquitto."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edged.config.models import EdgedConfig
from edged.engine import Engine
from edged.service.daemon import Daemon
from tests._mqtt import P, TestClient, reply_to


def _board(tmp_path: Path, temp_c: float) -> Path:
    root = tmp_path / "board"
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    set_temp(root, temp_c)
    return root


def set_temp(root: Path, temp_c: float) -> None:
    (root / "sys/class/thermal/thermal_zone0/temp").write_text(f"{int(temp_c * 1000)}\n")


def _cgroup(root: Path, max_mb: int, current_mb: int) -> Path:
    """The daemon's own cgroup v2 directory under the fake root, with its memory files."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/edged\n")
    group = root / "sys/fs/cgroup/edged"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(f"{max_mb * 2**20}\n")
    (group / "memory.current").write_text(f"{current_mb * 2**20}\n")
    return group


def _governed(start_daemon: Callable[..., Daemon], root: Path) -> Daemon:
    return start_daemon(
        governor={
            "sensor_root": str(root),
            "profile": "generic",
            "interval_s": 0.1,
            "dwell_s": 0.3,
            "hysteresis_c": 3,
        },
        model={"threads": 2},
    )


def _ask(gateway: TestClient, qid: str) -> dict:
    gateway.publish(
        f"{P}/w1/query",
        {"id": qid, "text": "Tell me about my heart.", "include_vitals": False, "max_tokens": 16},
    )
    return gateway.wait_for(reply_to(qid)).json()


def test_critical_temperature_pauses_the_model_but_not_alerts(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    root = _board(tmp_path, 45.0)
    daemon = _governed(start_daemon, root)
    assert _ask(gateway, "cool")["finish_reason"] == "length"

    set_temp(root, 95.0)  # generic profile: critical from 90 °C
    status = gateway.wait_for(
        lambda r: r.topic.endswith("/status") and r.json()["governor"] == "critical", timeout=5
    )
    assert status.json()["temp_c"] == 95.0
    hot = _ask(gateway, "hot")
    assert hot["finish_reason"] == "degraded" and hot["governor"]["state"] == "critical"
    gateway.publish(f"{P}/w1/vitals", {"ts": time.time(), "spo2": 84})
    assert gateway.wait_for(lambda r: r.topic == f"{P}/w1/alert").json()["severity"] == "high"

    set_temp(root, 40.0)  # below 90 - 3, and after the dwell: back to nominal
    gateway.drain(0.3)  # forget the statuses from before the heat
    gateway.wait_for(
        lambda r: r.topic.endswith("/status") and r.json()["governor"] == "nominal", timeout=5
    )
    assert _ask(gateway, "cool-again")["finish_reason"] == "length"
    assert daemon.governor.decision.model_available
    assert daemon.metrics().threads == 2


def test_hot_board_slows_down_and_caps_answers(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    root = _board(tmp_path, 85.0)  # generic: hot from 83 °C
    daemon = _governed(start_daemon, root)
    idle = daemon.governor.decision.idle_fraction
    assert daemon.governor.decision.state == "hot" and idle > 0
    assert daemon.metrics().threads == 1  # 2 threads, 1 core
    answer = _ask(gateway, "slow")
    assert answer["governor"] == {"state": "hot", "threads": 1}
    # The cores rested about the idle fraction of the answer's time: a little less, since the
    # prefill and the first step are not followed by a rest.
    rested = daemon.metrics().counters.paused_s * 1000 / answer["timing_ms"]["total"]
    assert 0.2 * idle <= rested <= idle + 0.02


def test_low_memory_headroom_answers_busy(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    root = _board(tmp_path, 45.0)
    # Plenty at start (the model loads), then the cgroup fills up.
    group = _cgroup(root, max_mb=2048, current_mb=100)
    _governed(start_daemon, root)
    assert _ask(gateway, "before")["finish_reason"] == "length"
    (group / "memory.current").write_text(f"{2000 * 2**20}\n")  # 48 MB headroom < 256 MB
    time.sleep(0.5)
    busy = _ask(gateway, "squeezed")
    assert busy["code"] == "busy" and busy["retry_after_ms"] > 0
    assert "memory headroom" in busy["message"]


def _set_shrunk_context(daemon: Daemon, tokens: int) -> None:
    """What a SIGHUP with a changed governor.shrunk_context does (governor keys are live)."""
    data = daemon.config.model_dump()
    data["governor"]["shrunk_context"] = tokens
    daemon.apply_config(EdgedConfig.model_validate(data))


def test_tight_memory_caps_the_context_and_a_refused_query_can_be_retried(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    root = _board(tmp_path, 45.0)
    group = _cgroup(root, max_mb=2048, current_mb=100)
    daemon = start_daemon(
        governor={"sensor_root": str(root), "profile": "generic", "interval_s": 0.1},
        model={"threads": 2},
    )
    roomy = _ask(gateway, "roomy")
    assert roomy["usage"]["completion_tokens"] == 16
    prompt_tokens = roomy["usage"]["prompt_tokens"]

    # 400 MB headroom: above min_headroom_mb (256), below shrink_context_below_mb (512).
    (group / "memory.current").write_text(f"{1648 * 2**20}\n")
    _set_shrunk_context(daemon, prompt_tokens + 5)
    time.sleep(0.5)
    short = _ask(gateway, "short")
    assert short["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 5

    assert prompt_tokens > 64
    _set_shrunk_context(daemon, 64)  # below the prompt
    time.sleep(0.5)
    busy = _ask(gateway, "retry-me")
    assert busy["code"] == "busy" and busy["retry_after_ms"] > 0
    assert "memory cap of 64 tokens" in busy["message"]

    # Memory frees up: the same id is answered for real, not with a stored `busy`.
    (group / "memory.current").write_text(f"{100 * 2**20}\n")
    time.sleep(0.5)
    answer = _ask(gateway, "retry-me")
    assert answer["usage"]["completion_tokens"] == 16


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_a_hot_big_little_board_keeps_inference_on_its_big_core(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    root = _board(tmp_path, 85.0)  # generic: hot from 83 °C, so half the cores: one
    cpus = sorted(os.sched_getaffinity(0))[:2]
    little, big = cpus
    for cpu, capacity in ((little, 446), (big, 1024)):
        path = root / f"sys/devices/system/cpu/cpu{cpu}/cpu_capacity"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{capacity}\n")
    daemon = _governed(start_daemon, root)
    assert daemon.metrics().threads == 1
    # Without the capacities the first allowed core (the little one) would be kept.
    engine = daemon.backend
    assert isinstance(engine, Engine)  # the onnxruntime CPU backend: its threads, pinned
    assert engine.cores.cpu_set() == {big}
    assert engine.cores.pool_threads
    for tid in engine.cores.pool_threads:
        assert os.sched_getaffinity(tid) == {big}
    assert _ask(gateway, "on-big")["governor"] == {"state": "hot", "threads": 1}


def test_configured_bands_replace_the_profiles(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    """A fleet profile for boards with a fan (or a tighter enclosure) sets its own bands."""
    root = _board(tmp_path, 55.0)  # nominal for the generic profile (warm from 75 °C)
    daemon = start_daemon(
        governor={
            "sensor_root": str(root),
            "profile": "generic",
            "interval_s": 0.1,
            "warm_c": 40,
            "hot_c": 50,
            "critical_c": 60,
        },
        model={"threads": 2},
    )
    assert daemon.governor.decision.state == "hot"
    assert _ask(gateway, "banded")["governor"]["state"] == "hot"
