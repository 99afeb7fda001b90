"""Prometheus /metrics (`metrics.listen`): scraped from a real daemon on a real broker while it
answers, and the rules a monitoring system relies on (names, units, no ids as labels)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edged.config.loader import ConfigError, parse_config
from edged.domain import GovernorState, NodeState
from edged.service.broker import PrivateBroker, free_port
from edged.service.daemon import Daemon
from edged.service.metrics import CounterValues, Metrics
from edged.service.prometheus import families
from tests._mqtt import TestClient, daemon_config, reply_to

P = "edged/v1"
WEARER = "ward3-bed12-secret"  # must never appear in the exposition
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def metered(start_daemon: Callable[..., Daemon]) -> tuple[Daemon, int]:
    port = free_port()
    daemon = start_daemon(metrics={"listen": f"127.0.0.1:{port}"})
    assert daemon.metrics_server is not None and daemon.metrics_server.port == port
    return daemon, port


def test_scrape_while_the_daemon_answers(metered: tuple[Daemon, int], gateway: TestClient) -> None:
    daemon, port = metered
    # A query long enough to be running when scraped (the random test model rambles).
    query = {"id": "q-secret-1", "text": "Tell me about my heart.", "include_vitals": False}
    gateway.publish(f"{P}/{WEARER}/query", {**query, "stream": True, "max_tokens": 300})
    gateway.wait_for(lambda r: r.topic == f"{P}/{WEARER}/advice/stream")
    _, during = scrape(port)
    assert value(during, "edged_requests_processing") == 1
    advice = gateway.wait_for(reply_to("q-secret-1"), timeout=60).json()

    gateway.publish(f"{P}/{WEARER}/vitals", {"ts": time.time(), "spo2": 85, "resp_rate": 26})
    alert = gateway.wait_for(lambda r: r.topic == f"{P}/{WEARER}/alert").json()
    gateway.publish(f"{P}/{WEARER}/query", {"id": "q-secret-2", "prompt": "no text field"})
    error = gateway.wait_for(reply_to("q-secret-2")).json()
    wait_until(lambda: daemon.metrics().counters.errors == 1)

    text, after = scrape(port)
    assert WEARER not in text and "q-secret" not in text  # no ids, as labels or otherwise
    assert value(after, "edged_requests_processing") == 0
    assert value(after, "edged_queries_total", outcome="advice") == 1
    # The malformed query was refused, never accepted: an error reply, not a query's outcome.
    assert value(after, "edged_queries_total", outcome="error") == 0
    finish = advice["finish_reason"]
    assert value(after, "edged_advice_total", finish_reason=finish) == 1
    assert value(after, "edged_errors_total", code=error["code"]) == 1
    assert value(after, "edged_alerts_total", severity=alert["severity"]) == 1
    assert value(after, "edged_vitals_messages_total") == 1
    usage = advice["usage"]
    assert value(after, "edged_tokens_predicted_total") == usage["completion_tokens"]
    # The system prompt came from the prefix cache: only the rest was computed.
    prompt = value(after, "edged_prompt_tokens_total")
    assert prompt is not None and 0 < prompt < usage["prompt_tokens"]
    assert (value(after, "edged_tokens_predicted_seconds_total") or 0) > 0
    assert (value(after, "edged_prompt_seconds_total") or 0) > 0
    assert (value(after, "edged_decode_tokens_per_second") or 0) > 0
    assert value(after, "edged_answered_store_entries") == 1  # the malformed query is not
    assert value(after, "edged_node_state", state="online") == 1
    assert value(after, "edged_governor_state", state="nominal") == 1
    assert value(after, "edged_inference_threads") == daemon.metrics().threads
    assert (value(after, "edged_model_load_seconds") or 0) > 0
    build = [k for k in after if k[0] == "edged_build_info"]
    assert len(build) == 1 and ("model", "tiny-qwen3-int4") in build[0][1]


def test_metrics_are_off_by_default(daemon: Daemon) -> None:
    assert daemon.config.metrics.listen is None and daemon.metrics_server is None


def test_a_taken_port_costs_the_metrics_not_the_node(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = start_daemon(metrics={"listen": f"127.0.0.1:{port}"})
        assert daemon.metrics_server is None
        gateway.publish(f"{P}/w1/query", {"id": "still-served", "text": "hi", "max_tokens": 4})
        assert gateway.wait_for(reply_to("still-served")).json()["id"] == "still-served"


@pytest.mark.parametrize("listen", ["9464", "localhost", "127.0.0.1:0", "127.0.0.1:70000", ":80"])
def test_a_bad_listen_address_is_a_config_error(
    broker: PrivateBroker, tmp_path: Any, listen: str
) -> None:
    data = daemon_config(broker.port, tmp_path, metrics={"listen": listen})
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert "metrics.listen" in str(raised.value) and "HOST:PORT" in str(raised.value)


def _snapshot(**changes: Any) -> Metrics:
    base = Metrics(
        state=NodeState.DEGRADED,
        connected=True,
        ready=False,
        model=None,
        quantization=None,
        threads=None,
        governor=GovernorState.HOT,
        temp_c=None,
        mem_available_mb=512.0,
        queue=3,
        running=False,
        decode_tps=None,
        uptime_s=12.5,
        answered_stored=0,
        model_load_s=None,
        group_members=None,
        counters=CounterValues(answered=5, advice=2, errors=4, by_label={"errors": {"busy": 4}}),
    )
    return replace(base, **changes)


def test_exposition_uses_base_units_and_omits_what_is_unknown() -> None:
    rendered = {f.name: f for f in families(_snapshot(), {"version": "x"})}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in rendered.values()
        for s in f.samples
    }
    assert samples[("edged_memory_headroom_bytes", ())] == 512 * 2**20
    assert samples[("edged_requests_deferred", ())] == 3
    assert samples[("edged_queries_total", (("outcome", "error"),))] == 3  # answered - advice
    assert samples[("edged_errors_total", (("code", "busy"),))] == 4
    assert samples[("edged_governor_state", (("state", "hot"),))] == 1
    assert samples[("edged_governor_state", (("state", "nominal"),))] == 0
    # No model, no sensor, no answer yet: no series, rather than a misleading zero.
    for unknown in ("edged_temperature_celsius", "edged_inference_threads"):
        assert unknown not in rendered
    assert "edged_decode_tokens_per_second" not in rendered
    assert "edged_model_load_seconds" not in rendered
    for family in rendered.values():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
