"""Test helpers for the daemon tests: a real mosquitto, the real daemon, a paho test client."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.models import TINY_QWEN3_INT4

REPO = Path(__file__).resolve().parent.parent
P = "edged/v1"
MODEL = TINY_QWEN3_INT4


def daemon_config(port: int, state_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a daemon on the test broker; sections override defaults."""
    config: dict[str, Any] = {
        "node_id": "test-node",
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
            "connect_timeout_s": 3,
        },
        "model": {"path": str(MODEL), "context_length": 1024, "threads": 1},
        "limits": {"default_max_tokens": 24},
        "delivery": {"state_dir": str(state_dir)},
        "status": {"interval_s": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


@dataclass
class Received:
    topic: str
    payload: bytes
    correlation: bytes | None
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class TestClient:
    """A gateway: MQTT 5, persistent session, collects everything it receives."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        port: int,
        subscriptions: list[str],
        client_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        self.inbox: queue.Queue[Received] = queue.Queue()
        self.seen: list[Received] = []
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._subs = subscriptions
        self._subscribed = threading.Event()
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in self._subs])
        self._client.on_subscribe = lambda c, u, mid, codes, p: self._subscribed.set()
        self._client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self._client.loop_start()
        # Messages published from the SUBACK on reach this client.
        assert self._subscribed.wait(5), f"test client never subscribed on port {port}"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        self.inbox.put(Received(msg.topic, bytes(msg.payload), corr, bool(msg.retain)))

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        qos: int = 1,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        retain: bool = False,
    ) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = Properties(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos:
            info.wait_for_publish(5)

    def wait_for(self, match: Callable[[Received], bool], timeout: float = 15.0) -> Received:
        for item in self.seen:
            if match(item):
                self.seen.remove(item)
                return item
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if match(item):
                return item
            self.seen.append(item)
        raise AssertionError(
            f"no matching message within {timeout} s; saw "
            f"{[(r.topic, r.payload[:120]) for r in self.seen][-10:]}"
        )

    def drain(self, seconds: float) -> list[Received]:
        """Everything that arrives within `seconds` (plus anything seen but unmatched)."""
        out, self.seen = list(self.seen), []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                out.append(self.inbox.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def mosquitto_pub(port: int, topic: str, payload: Any, *extra: str) -> None:
    """Publish at QoS 1 with the real `mosquitto_pub` CLI, as a third-party gateway would."""
    subprocess.run(
        [
            "mosquitto_pub",
            *extra,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload if isinstance(payload, str) else json.dumps(payload),
        ],
        check=True,
        timeout=10,
    )


def reply_to(query_id: str) -> Callable[[Received], bool]:
    """Matches the final reply (advice or error) of a query, not stream chunks."""

    def match(r: Received) -> bool:
        if r.topic.rsplit("/", 1)[-1] in ("stream", "status", "query", "vitals", "cancel"):
            return False
        try:
            body = r.json()
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("id") == query_id

    return match


class DaemonProcess:
    """`python -m edged run` in a child process, so it can be SIGKILLed for real."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config_path = workdir / "edged.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env_vars: str) -> None:
        """Start `edged run`; `env_vars` are added to its environment (e.g. NOTIFY_SOCKET)."""
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edged", "-vv", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"daemon log never showed {text!r} x{count}:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
