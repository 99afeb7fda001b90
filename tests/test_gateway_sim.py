"""tools/gateway_sim.py against a real mosquitto and the real daemon on the bundled model."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from edged.config.loader import parse_config
from edged.models import TINY_QWEN3_INT4
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent
MODEL = TINY_QWEN3_INT4


def _load_gateway_sim() -> ModuleType:
    # tools/ is not a package; the module registers itself so its dataclasses resolve.
    path = REPO / "tools" / "gateway_sim.py"
    spec = importlib.util.spec_from_file_location("gateway_sim", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gateway_sim = _load_gateway_sim()


@pytest.fixture
def daemon(broker: PrivateBroker, tmp_path: Path) -> Iterator[Daemon]:
    config = parse_config(
        {
            "node_id": "sim-test-node",
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "connect_timeout_s": 3},
            "model": {"path": str(MODEL), "context_length": 1024, "threads": 1},
            "delivery": {"state_dir": str(tmp_path / "state")},
        }
    )
    running = Daemon(config)
    running.start()
    assert running.wait_ready(5.0), "daemon did not subscribe at the test broker"
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("reply_mode", ["response-topic", "reply-to"])
def test_every_simulated_query_gets_its_reply_and_only_broken_messages_get_errors(
    broker: PrivateBroker, daemon: Daemon, reply_mode: str
) -> None:
    result = gateway_sim.run_simulation(
        "127.0.0.1",
        broker.port,
        wearers=5,
        vitals_rate=40.0,
        query_rate=1.0,
        count=10,
        reply_mode=reply_mode,
        deteriorating=2,
        max_tokens=16,
        stream=True,
        invalid_every=4,
        invalid_vitals_every=50,
        vitals_qos=1,
        reply_timeout_s=10.0,
        seed=7,
    )

    assert result.queries_sent == 10
    assert result.missing == []
    assert result.answered == 10
    assert result.unexpected == []
    assert result.duplicate_replies == 0
    assert result.invalid_queries_sent == 2
    assert sum(result.errors.values()) == result.invalid_queries_sent
    assert result.advice == 10 - result.invalid_queries_sent
    assert result.stream_mismatches == []
    assert result.vitals_sent >= 300
    assert result.invalid_vitals_sent >= 6
    assert result.vitals_errors == result.invalid_vitals_sent
    assert result.ok
    # Every valid summary reached the daemon (QoS 1); its counter may trail the last error.
    valid_vitals = result.vitals_sent - result.invalid_vitals_sent
    deadline = time.monotonic() + 5.0
    while daemon.metrics().counters.vitals < valid_vitals and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.metrics().counters.vitals == valid_vitals


def test_refuses_a_broker_that_is_not_on_this_machine() -> None:
    with pytest.raises(gateway_sim.SimulationError, match="non-loopback"):
        gateway_sim.run_simulation("192.0.2.1", 1883, wearers=1, count=1)


def test_the_command_line_reports_progress_on_stderr_and_the_report_on_stdout(
    broker: PrivateBroker, daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim.json"
    argv = ["--port", str(broker.port), "--wearers", "2", "--vitals-rate", "5"]
    argv += ["--query-rate", "0.5", "--duration", "2.5", "--max-tokens", "8"]
    argv += ["--reply-timeout", "10", "--seed", "3", "--progress-every", "0.5", "--json", str(out)]

    assert gateway_sim.main(argv) == 0

    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("gateway_sim: ")]
    # One line every 0.5 s over a 2.5 s run, each with the elapsed and planned time.
    assert len(progress) >= 4, captured.err
    assert "/2.5 s, " in progress[-1] and " vitals, " in progress[-1]
    assert "answered" in progress[-1]
    assert "gateway_sim:" not in captured.out, "progress must stay off stdout"
    assert "result         OK" in captured.out
    report = json.loads(out.read_text())
    assert report["ok"] and report["vitals_sent"] > 0


def test_progress_every_zero_keeps_stderr_quiet(
    broker: PrivateBroker, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", str(broker.port), "--wearers", "1", "--vitals-rate", "5", "--query-rate"]
    argv += ["1", "--count", "1", "--max-tokens", "4", "--progress-every", "0"]

    assert gateway_sim.main(argv) == 0

    assert "gateway_sim:" not in capsys.readouterr().err
