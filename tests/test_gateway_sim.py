"""tools/gateway_sim.py against a real mosquitto and the real daemon on the bundled model."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from edged.config.loader import parse_config
from edged.models import TINY_QWEN3_INT4
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon
from tests._mqtt import P, TestClient

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


# -- a share group: who answered, what came twice (issue #15) -----------------------------------


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def test_answers_and_alerts_are_reported_per_node_of_a_share_group(
    start_daemon: Callable[..., Daemon], broker: PrivateBroker, tmp_path: Path
) -> None:
    nodes = [
        start_daemon(
            node_id=name,
            mqtt={"share_group": "ward"},
            delivery={"state_dir": str(tmp_path / name)},
            clinical={"alert_cooldown_s": 0},
        )
        for name in ("node-a", "node-b")
    ]
    # Each sees the other's retained status before the first vitals: one owner per wearer.
    assert _wait_until(lambda: all(n.metrics().group_members == 2 for n in nodes), 5.0)

    result = gateway_sim.run_simulation(
        "127.0.0.1",
        broker.port,
        wearers=6,
        vitals_rate=20.0,
        query_rate=1.0,
        count=12,
        deteriorating=3,
        max_tokens=8,
        reply_timeout_s=20.0,
        seed=11,
    )

    assert result.ok, gateway_sim.format_report(result)
    assert result.advice == 12 and result.duplicates == []
    # The broker spreads queries over both members, and the report says who answered.
    assert set(result.answers_by_node) == {"node-a", "node-b"}
    assert sum(result.answers_by_node.values()) == result.advice
    assert result.answered_while_sending <= result.advice
    # Deteriorating wearers alert; each one's alerts come from one node, each with its own id.
    assert result.alerts > 0
    assert set(result.alerts_by_node) <= {"node-a", "node-b"}
    assert sum(result.alerts_by_node.values()) == result.alerts
    assert result.alerts_by_wearer, "no wearer alerted"
    for wearer, seen in result.alerts_by_wearer.items():
        assert len(seen["nodes"]) == 1, f"{wearer}: alerts from {seen['nodes']}"
        assert seen["alert_ids"] == seen["alerts"], f"{wearer}: an alert_id came twice"
    assert result.duplicate_alerts == 0
    report = gateway_sim.format_report(result)
    assert "answers by     node-a " in report and "node-b" in report
    assert "raised by more than one node" in report


def _repeat_first_reply(port: int, forge: bool, failures: list[str]) -> threading.Thread:
    """Once the sim's first query is answered, make it answered twice: re-publish the query
    (a gateway's retry; the daemon re-sends its stored reply) or, with `forge`, publish a
    copy of the reply that differs (a responder that regenerated it)."""
    client = TestClient(port, [f"{P}/+/query", f"{P}/+/sim/+"])

    def run() -> None:
        try:
            query = client.wait_for(lambda r: r.topic.endswith("/query"), 10.0)
            query_id = query.json()["id"]
            reply = client.wait_for(
                lambda r: "/sim/" in r.topic and r.json().get("id") == query_id, 10.0
            )
            if forge:
                client.publish(reply.topic, {**reply.json(), "node": "impostor"})
            else:
                client.publish(query.topic, query.payload)
        except AssertionError as exc:
            failures.append(str(exc))
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("forge", "identical"), [(False, True), (True, False)])
def test_a_query_answered_twice_is_reported_with_whether_the_copies_are_identical(
    broker: PrivateBroker, daemon: Daemon, forge: bool, identical: bool
) -> None:
    failures: list[str] = []
    repeater = _repeat_first_reply(broker.port, forge, failures)

    result = gateway_sim.run_simulation(
        "127.0.0.1",
        broker.port,
        wearers=1,
        vitals_rate=2.0,
        query_rate=1.0,
        count=3,
        reply_mode="reply-to",
        max_tokens=8,
        reply_timeout_s=10.0,
        seed=5,
    )
    repeater.join(15.0)

    assert failures == []
    assert result.answered == 3 and result.missing == []
    assert result.duplicate_replies == 1
    assert not result.ok, "a query answered twice is a failed run"
    [dup] = result.duplicates
    assert dup["copies"] == 1 and dup["identical"] is identical
    assert dup["nodes"] == ["sim-test-node", "impostor" if forge else "sim-test-node"]
    # Answers count first replies only, so a copy does not inflate the node's share.
    assert result.answers_by_node == {"sim-test-node": 3}
    report = gateway_sim.format_report(result)
    assert "duplicates     1 queries answered more than once" in report
    assert ("identical" if identical else "DIFFERENT") in report
