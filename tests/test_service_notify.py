"""The systemd notify protocol, for real: a unix datagram socket stands in for systemd and the
daemon runs as `python -m edged run` with NOTIFY_SOCKET and WATCHDOG_USEC set."""

from __future__ import annotations

import os
from pathlib import Path

from edged.service.broker import PrivateBroker
from edged.service.notify import Notifier
from tests._mqtt import DaemonProcess, P, TestClient, daemon_config
from tests._systemd import FakeSystemd


def test_ready_watchdog_and_stopping_in_order_and_pings_stop_when_the_worker_wedges(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    # pause_ms 8000 between decode steps stands in for a decode step that does not return; the
    # stall timeout and the drain are shortened so the test does not wait minutes.
    config = daemon_config(
        broker.port,
        tmp_path / "state",
        governor={"pause_ms": 8000},
        service={"stall_timeout_s": 1.0},
        limits={"drain_timeout_s": 1},
    )
    proc = DaemonProcess(config, tmp_path)
    # WatchdogSec=0.4: a ping every 0.2 s.
    proc.start(NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC="400000")
    gateway = TestClient(broker.port, [f"{P}/w1/#"])
    try:
        systemd.wait_for("READY=1", timeout=30)
        assert "connected to broker" in proc.log(), "READY only once the broker is connected"
        pings = systemd.collect(1.0).count("WATCHDOG=1")
        assert pings >= 3
        ready_at = systemd.messages.index("READY=1")
        assert "WATCHDOG=1" not in systemd.messages[:ready_at]

        gateway.publish(
            f"{P}/w1/query",
            {
                "id": "wedge",
                "text": "Tell me about my heart.",
                "include_vitals": False,
                "max_tokens": 50,
            },
        )
        proc.wait_log("unhealthy, withholding the watchdog ping", timeout=10)
        systemd.collect(0.3)
        assert systemd.collect(1.0).count("WATCHDOG=1") == 0
        assert any(
            m.startswith("STATUS=unhealthy: inference worker stalled") for m in systemd.messages
        )

        assert proc.terminate(timeout=60) == 0
        systemd.wait_for("STOPPING=1", timeout=5)
        assert systemd.messages.index("STOPPING=1") > ready_at
    finally:
        proc.stop()
        gateway.close()
        systemd.close()


def test_notifier_is_silent_outside_systemd() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.ready("ok")  # no socket, no error


def test_watchdog_interval_is_half_of_watchdog_sec_and_only_for_this_pid(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "30000000"}
    assert Notifier(environ=env).watchdog_interval_s == 15.0
    assert Notifier(environ={**env, "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier(environ={**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 15.0


def test_broker_password_comes_from_file_config_or_systemd_credential(tmp_path: Path) -> None:
    from edged.config.models import MqttConfig
    from edged.mqtt.transport import read_password

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_password(MqttConfig(username="edged"), env) == "from-systemd"
    assert read_password(MqttConfig(username="edged", password="inline"), env) == "inline"
    (tmp_path / "pw").write_text("from-file\n")
    assert (
        read_password(MqttConfig(username="edged", password_file=tmp_path / "pw"), env)
        == "from-file"
    )
    assert read_password(MqttConfig(username="edged"), {}) is None
