"""What the daemon promises at its seams, each against a real mosquitto and the real daemon.

Each test here was written for one defect of the old daemon core (issue #11) and failed on it:
readiness announced before the broker had the subscriptions, a vitals message acknowledged
before its alert was safe at the broker, a reload that starved systemd's watchdog behind a
generation, durable writes on the network and inference threads, and a cgroup CPU quota that
was read but not honoured.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from edged.config.loader import parse_config
from edged.service.answer_store import AnswerStore
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon
from tests._link import PUBLISH, SUBACK, SUBSCRIBE, FaultyLink, packet_type, publish_topic
from tests._mqtt import DaemonProcess, P, TestClient, daemon_config, reply_to
from tests._systemd import FakeSystemd

# With the random test model this runs past 400 tokens before any EOS (see test_daemon.py).
LONG_TEXT = "Tell me about my heart."
ALERTING = {"spo2": 84, "resp_rate": 26}  # NEWS2 6 and the spo2_low red flag: a high alert


def _query(qid: str, **fields: Any) -> dict[str, Any]:
    return {"id": qid, "text": LONG_TEXT, "include_vitals": False, "max_tokens": 8, **fields}


def _slow_subscribe(packet: bytes) -> str | float:
    """A link on which a SUBSCRIBE takes 1.5 s to reach the broker."""
    return 1.5 if packet_type(packet) == SUBSCRIBE else "pass"


# -- 1. readiness waits for the SUBACK ---------------------------------------------------------


def test_ready_is_sent_only_once_the_broker_has_the_subscriptions(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    link = FaultyLink(broker.port, to_broker=_slow_subscribe)
    systemd = FakeSystemd(tmp_path / "notify.sock")
    gateway = TestClient(broker.port, [f"{P}/w1/#"])
    proc = DaemonProcess(daemon_config(link.port, tmp_path / "state"), tmp_path)
    proc.start(NOTIFY_SOCKET=str(systemd.path))
    try:
        systemd.wait_for("READY=1", timeout=30)
        # A gateway that trusts READY publishes at once: the query must not be lost.
        gateway.publish(f"{P}/w1/query", _query("right-after-ready"))
        answer = gateway.wait_for(reply_to("right-after-ready"), timeout=15).json()
        assert answer["finish_reason"] in ("stop", "length")
        subscribed_at = next(s.at for s in link.seen if s.kind == SUBSCRIBE)
        ready_at = next(t for t, field in systemd.stamped if field == "READY=1")
        assert ready_at >= subscribed_at
    finally:
        proc.stop()
        gateway.close()
        systemd.close()
        link.close()


def test_the_online_status_is_published_only_after_the_suback(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    # A SUBACK that is slow to come back, as from a broker cluster that acknowledges once the
    # subscription is in effect on every member: `online` must wait for it.
    link = FaultyLink(broker.port, to_client=lambda p: 1.5 if packet_type(p) == SUBACK else "pass")
    gateway = TestClient(broker.port, [f"{P}/w1/#", f"{P}/_node/+/status"])
    daemon = Daemon(parse_config(daemon_config(link.port, tmp_path / "state")))
    daemon.start()
    try:
        status = gateway.wait_for(lambda r: r.topic.endswith("/status"), timeout=15)
        assert status.json()["state"] == "online"
        suback_at = next(s.at for s in link.seen if s.kind == SUBACK)
        status_at = next(s.at for s in link.seen if (s.topic or "").endswith("/status"))
        assert status_at >= suback_at
        gateway.publish(f"{P}/w1/query", _query("on-online"))
        assert gateway.wait_for(reply_to("on-online"), timeout=15).json()["id"] == "on-online"
    finally:
        daemon.stop()
        gateway.close()
        link.close()


# -- 2. an alert is never lost to a crash ------------------------------------------------------


def test_vitals_are_acknowledged_only_after_their_alert_is_at_the_broker(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    dropped = threading.Event()

    def lose_alerts(packet: bytes) -> str:
        # The alert never reaches the broker (a connection dying just after paho took it).
        if packet_type(packet) == PUBLISH and publish_topic(packet).endswith("/alert"):
            dropped.set()
            return "drop"
        return "pass"

    link = FaultyLink(broker.port, to_broker=lose_alerts)
    config = daemon_config(link.port, tmp_path / "state")
    gateway = TestClient(broker.port, [f"{P}/w1/alert"])
    first = DaemonProcess(config, tmp_path)
    first.start()
    try:
        first.wait_log("topic filters: ready")
        gateway.publish(f"{P}/w1/vitals", {"ts": time.time(), **ALERTING})
        assert dropped.wait(15), "the daemon never raised the alert"
        time.sleep(1.0)  # time enough for a premature PUBACK of the vitals to reach the broker
        first.kill()
        # The same node again, now on a good link: the broker still holds the unacknowledged
        # vitals for its session and redelivers them; the alert is raised again.
        config["mqtt"]["port"] = broker.port
        second = DaemonProcess(config, tmp_path)
        second.start()
        try:
            alert = gateway.wait_for(lambda r: r.topic == f"{P}/w1/alert", timeout=20).json()
            assert alert["severity"] == "high" and "spo2_low" in alert["red_flags"]
        finally:
            second.stop()
    finally:
        first.stop()
        gateway.close()
        link.close()


# -- 3. a reload never starves the watchdog ----------------------------------------------------


def test_a_reload_during_a_long_generation_keeps_the_watchdog_fed(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    # 30 ms between decode steps: a 150-token answer takes about 5 s, six watchdog periods.
    config = daemon_config(broker.port, tmp_path / "state", governor={"pause_ms": 30})
    proc = DaemonProcess(config, tmp_path)
    proc.start(NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC="1000000")  # ping every 0.5 s
    gateway = TestClient(broker.port, [f"{P}/w1/#"])
    try:
        systemd.wait_for("READY=1", timeout=30)
        gateway.publish(f"{P}/w1/query", _query("long", max_tokens=150))
        proc.wait_log("query w1/long queued")
        time.sleep(0.5)
        config["model"]["system_prompt"] = "You are a terse assistant. Answer in one line."
        proc.config_path.write_text(yaml.safe_dump(config))
        assert proc.proc is not None
        hup_at = time.monotonic()
        proc.proc.send_signal(signal.SIGHUP)
        answer = gateway.wait_for(reply_to("long"), timeout=30).json()
        done_at = time.monotonic()
        assert answer["usage"]["completion_tokens"] == 150
        assert done_at - hup_at > 2.0, "the generation ended too soon to show anything"
        pings = [t for t, f in systemd.stamped if f == "WATCHDOG=1" and hup_at <= t <= done_at]
        gaps = [b - a for a, b in zip([hup_at, *pings], [*pings, done_at], strict=True)]
        assert max(gaps) < 1.5, f"the watchdog went unfed for {max(gaps):.1f} s"
        proc.wait_log("system prompt changed", timeout=10)
        gateway.publish(f"{P}/w1/query", _query("after-reload"))
        assert gateway.wait_for(reply_to("after-reload")).json()["id"] == "after-reload"
    finally:
        proc.stop()
        gateway.close()
        systemd.close()


# -- 4. durable writes belong to the delivery owner --------------------------------------------


def test_no_durable_write_happens_on_the_network_or_inference_thread(
    monkeypatch: pytest.MonkeyPatch,
    start_daemon: Callable[..., Daemon],
    gateway: TestClient,
) -> None:
    writers: list[str] = []
    put = AnswerStore.put

    def recording_put(self: AnswerStore, *args: Any, **kwargs: Any) -> None:
        writers.append(threading.current_thread().name)
        put(self, *args, **kwargs)

    monkeypatch.setattr(AnswerStore, "put", recording_put)
    start_daemon(governor={"pause_ms": 20})  # about 20 ms a token: the first query runs ~1 s
    gateway.publish(f"{P}/w1/query", _query("running", max_tokens=50))
    gateway.publish(f"{P}/w1/query", _query("to-cancel"))
    gateway.publish(f"{P}/w1/query", _query("to-expire", deadline_s=0.3))
    gateway.publish(f"{P}/w1/cancel", {"id": "to-cancel"})
    assert gateway.wait_for(reply_to("to-cancel")).json()["code"] == "cancelled"
    assert gateway.wait_for(reply_to("to-expire")).json()["code"] == "deadline_exceeded"
    assert gateway.wait_for(reply_to("running")).json()["usage"]["completion_tokens"] == 50
    assert len(writers) == 3
    # Neither the MQTT network thread nor the decode loop ever waits for an fsync.
    assert not {"mqtt-network", "edged-worker"} & set(writers), writers


# -- 5. the cgroup CPU quota caps the threads --------------------------------------------------


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_a_cpu_quota_of_one_core_narrows_inference_to_one_core(
    tmp_path: Path, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    # A unit with CPUQuota=100% on a cgroup v2 board: cpu.max "100000 100000".
    root = tmp_path / "board"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/edged.service\n")
    group = root / "sys/fs/cgroup/edged.service"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text("100000 100000\n")
    daemon = start_daemon(
        governor={"sensor_root": str(root), "profile": "generic"}, model={"threads": 2}
    )
    assert daemon.metrics().threads == 1
    gateway.publish(f"{P}/w1/query", _query("quota"))
    answer = gateway.wait_for(reply_to("quota")).json()
    assert answer["governor"] == {"state": "nominal", "threads": 1}
    # The quota lifted (a reload of the unit): every core again, at the next reading.
    (group / "cpu.max").write_text("max 100000\n")
    deadline = time.monotonic() + 10
    while daemon.metrics().threads != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.metrics().threads == 2
