"""The clinical layer inside the running daemon, against a real mosquitto."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon
from tests._mqtt import TestClient, mosquitto_pub, reply_to

P = "edged/v1"
HIGH_RISK = {
    "heart_rate": {"mean": 128, "min": 120, "max": 135},
    "spo2": {"mean": 88, "min": 85},
    "resp_rate": 26,
    "temp_c": 38.4,
    "activity": "rest",
}


def _vitals(**fields: Any) -> dict[str, Any]:
    return {"ts": time.time(), "window_s": 60, **fields}


def test_low_spo2_and_fast_breathing_raise_a_high_alert_within_a_second(
    broker: PrivateBroker, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    start_daemon()
    sent = time.monotonic()
    mosquitto_pub(broker.port, f"{P}/w-sick/vitals", _vitals(spo2=85, resp_rate=26))
    alert = gateway.wait_for(lambda r: r.topic == f"{P}/w-sick/alert", timeout=5)
    assert time.monotonic() - sent < 1.0
    body = alert.json()
    assert body["severity"] == "high" and body["wearer"] == "w-sick"
    assert body["news2"]["score"] == 6 and "spo2_low" in body["red_flags"]
    assert (
        body["news2"]["components"]["spo2"] == 3 and body["news2"]["components"]["resp_rate"] == 3
    )


def test_a_normal_summary_raises_no_alert(
    broker: PrivateBroker, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    daemon = start_daemon()
    mosquitto_pub(
        broker.port,
        f"{P}/w-well/vitals",
        _vitals(
            heart_rate=70,
            spo2=98,
            resp_rate=14,
            temp_c=36.8,
            systolic_bp=120,
            consciousness="alert",
        ),
    )
    assert not [r for r in gateway.drain(1.0) if r.topic.endswith("/alert")]
    assert daemon.metrics().counters.vitals == 1


def test_repeated_alerts_are_rate_limited_but_worsening_goes_out(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    start_daemon(clinical={"alert_cooldown_s": 60})
    for _ in range(3):
        gateway.publish(f"{P}/w1/vitals", _vitals(resp_rate=26, heart_rate=115))
    gateway.publish(f"{P}/w1/vitals", _vitals(resp_rate=26, heart_rate=135, spo2=91))
    alerts = [r.json()["severity"] for r in gateway.drain(1.0) if r.topic == f"{P}/w1/alert"]
    assert alerts == ["medium", "high"]


def test_alert_is_not_held_behind_a_running_generation(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    start_daemon(governor={"pause_ms": 30})
    # This prompt runs past 400 tokens before any EOS with the random test model.
    gateway.publish(
        f"{P}/w1/query",
        {
            "id": "slow",
            "text": "Tell me about my heart.",
            "max_tokens": 100,
            "stream": True,
            "include_vitals": False,
        },
    )
    gateway.wait_for(lambda r: r.topic == f"{P}/w1/advice/stream")
    sent = time.monotonic()
    gateway.publish(f"{P}/w2/vitals", _vitals(spo2=84))
    gateway.wait_for(lambda r: r.topic == f"{P}/w2/alert", timeout=5)
    assert time.monotonic() - sent < 0.5
    assert not [r for r in gateway.seen if reply_to("slow")(r)], "generation still running"


@pytest.mark.arm64
def test_query_from_a_high_risk_wearer_gets_triage_and_escalation(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    daemon = start_daemon()
    gateway.publish(f"{P}/w1/vitals", _vitals(**HIGH_RISK))
    gateway.publish(f"{P}/w1/query", {"id": "q", "text": "I feel a bit off. Is it serious?"})
    advice = gateway.wait_for(reply_to("q")).json()
    assert advice["triage"]["risk"] == "high" and advice["triage"]["news2"] >= 7
    assert "spo2_low" in advice["triage"]["red_flags"]
    assert "systolic_bp" in advice["triage"]["missing"]
    assert advice["escalation"] == daemon.config.clinical.escalation["high"]
    assert advice["finish_reason"] in ("stop", "length")
    assert advice["disclaimer"] == daemon.config.clinical.disclaimer


def test_query_without_vitals_has_null_score_and_no_escalation(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    start_daemon()
    gateway.publish(f"{P}/w9/query", {"id": "q", "text": "How much water should I drink?"})
    advice = gateway.wait_for(reply_to("q")).json()
    assert advice["triage"]["news2"] is None and advice["triage"]["risk"] is None
    assert len(advice["triage"]["missing"]) == 7
    assert advice["escalation"] is None


def test_include_vitals_puts_the_readings_into_the_prompt(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    start_daemon()
    gateway.publish(f"{P}/w1/vitals", _vitals(**HIGH_RISK))
    gateway.publish(f"{P}/w1/query", {"id": "with", "text": "How am I?", "max_tokens": 4})
    gateway.publish(
        f"{P}/w1/query",
        {"id": "without", "text": "How am I?", "max_tokens": 4, "include_vitals": False},
    )
    with_vitals = gateway.wait_for(reply_to("with")).json()
    without = gateway.wait_for(reply_to("without")).json()
    assert with_vitals["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 40
    # The guard does not depend on what went into the prompt.
    assert without["triage"] == with_vitals["triage"] and without["escalation"] is not None


def test_model_disabled_by_config_answers_degraded_from_triage(
    start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    daemon = start_daemon(model={"enabled": False})
    assert daemon.backend is None
    gateway.publish(f"{P}/w1/vitals", _vitals(**HIGH_RISK))
    gateway.publish(f"{P}/w1/query", {"id": "q", "text": "Is it serious?"})
    advice = gateway.wait_for(reply_to("q")).json()
    assert advice["finish_reason"] == "degraded"
    assert "NEWS2" in advice["text"] and advice["escalation"] is not None
    assert advice["model"] == {"name": None, "quant": None}
    usage = {"prompt_tokens": None, "completion_tokens": None, "history_turns": None}
    assert advice["usage"] == usage


def test_unloadable_model_still_serves_alerts_and_degraded_answers(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    daemon = start_daemon(model={"path": str(tmp_path / "no-such-model")})
    assert daemon.backend is None
    status = gateway.wait_for(lambda r: r.topic.endswith("/status"))
    assert status.json()["state"] == "degraded" and status.json()["model"] is None
    gateway.publish(f"{P}/w1/vitals", _vitals(spo2=84))
    gateway.wait_for(lambda r: r.topic == f"{P}/w1/alert")
    gateway.publish(f"{P}/w1/query", {"id": "q", "text": "help"})
    assert gateway.wait_for(reply_to("q")).json()["finish_reason"] == "degraded"


def test_no_vitals_values_or_query_text_in_logs_at_info(
    start_daemon: Callable[..., Daemon], gateway: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    start_daemon()
    canary_text = "CANARY-7f3a my chest hurts since Tuesday"
    gateway.publish(
        f"{P}/w1/vitals",
        _vitals(heart_rate=173.21, spo2=83.37, resp_rate=29.43, temp_c=39.87, systolic_bp=87.65),
    )
    gateway.publish(f"{P}/w1/vitals", _vitals(spo2={"mean": 95, "min": 131.17}))  # an error
    gateway.publish(f"{P}/w1/query", {"id": "canary", "text": canary_text})
    gateway.publish(f"{P}/w1/query", {"id": "bad", "text": canary_text, "max_tokens": 99999})
    gateway.wait_for(reply_to("canary"))
    gateway.wait_for(reply_to("bad"))
    gateway.wait_for(lambda r: r.topic == f"{P}/w1/alert")
    time.sleep(0.2)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "alert for w1" in logged and "answered" in logged, "the log is really captured"
    for canary in ("CANARY", "chest", "173.2", "83.37", "29.43", "39.87", "87.65", "131.17"):
        assert canary not in logged, canary
