"""`edged demo`: everything on this machine, for a first look.

Starts a private mosquitto on a free localhost port, the daemon on the bundled demo model, and
a few simulated wearables: one with normal vitals, one whose SpO2 falls, a handful of questions
(one streamed, one malformed). Prints what comes back, then stops what it started.

The bundled demo model was trained here on synthetic dialogues (tools/train_demo_model.py): its
answers read as advice and quote the wearer's numbers, but it is not a medical model, and the
demo says so. Export a real model with `edged model export` and pass `--model` for real advice.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config.loader import parse_config
from edged.engine.manifest import read_manifest
from edged.models import DEMO_MODEL
from edged.service.broker import BrokerError, PrivateBroker
from edged.service.daemon import Daemon

PREFIX = "edged"


def _vitals(ts: float, hr: float, spo2: float, rr: float, temp: float) -> dict[str, Any]:
    return {
        "ts": int(ts),
        "window_s": 60,
        "heart_rate": {"mean": hr, "min": hr - 6, "max": hr + 8},
        "spo2": {"mean": spo2, "min": spo2 - 1},
        "resp_rate": rr,
        "temp_c": temp,
        "activity": "rest",
        "on_oxygen": False,
    }


def _say(kind: str, text: str) -> None:
    print(f"  {kind:<8} {text}", flush=True)


def run_demo(model: Path | None, seconds: float) -> int:
    model = model or DEMO_MODEL
    if not (model / "edged-model.json").is_file():
        print(f"edged demo: no model at {model}; pass --model DIR", file=sys.stderr)
        return 1
    logging.getLogger("edged").setLevel(logging.WARNING)
    description = read_manifest(model).description
    try:
        broker = PrivateBroker()
    except BrokerError as exc:
        print(f"edged demo: {exc}", file=sys.stderr)
        return 1
    with broker, tempfile.TemporaryDirectory(prefix="edged-demo-") as state:
        print(f"broker:  mosquitto on 127.0.0.1:{broker.port} (private, stopped at the end)")
        if description:
            print(f"model:   {description}")
        config = parse_config(
            {
                "node_id": "demo-node",
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": PREFIX},
                "model": {"path": str(model), "context_length": 1024},
                "limits": {"default_max_tokens": 160},
                "delivery": {"state_dir": state},
            }
        )
        daemon = Daemon(config)
        backend = daemon.backend
        if backend is None:
            print("daemon:  the model did not load: answers will be triage-only (degraded)")
        else:
            info = backend.info
            print(
                f"daemon:  node demo-node, model {info.name} "
                f"({info.quantization}, {info.threads} threads)"
            )
        daemon.start()
        if not daemon.wait_ready(10):
            print("daemon:  not subscribed at the broker within 10 s", file=sys.stderr)
        try:
            status = _scenario(broker.port, seconds)
            print(
                f"\nAbout the model: {description}"
                if description
                else "\nThis model's manifest has no description; export a real model with "
                "`edged model export` and pass --model to read real advice."
            )
            return status
        finally:
            daemon.stop()
            print("stopped: daemon and broker")


def _scenario(port: int, seconds: float) -> int:
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="edged-demo-gateway", protocol=mqtt.MQTTv5
    )
    client.on_message = lambda c, u, m: inbox.put((m.topic, bytes(m.payload)))
    subscribed = threading.Event()
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe(
            [
                (f"{PREFIX}/v1/+/advice", 1),
                (f"{PREFIX}/v1/+/alert", 1),
                (f"{PREFIX}/v1/+/error", 1),
                (f"{PREFIX}/v1/+/advice/stream", 0),
                (f"{PREFIX}/v1/_node/+/status", 1),
            ]
        )
        subscribed.wait(5)  # the SUBACK: replies published from now on reach us
        now = time.time()
        print("\nwearables publish vitals:")
        client.publish(
            f"{PREFIX}/v1/w-alice/vitals", json.dumps(_vitals(now, 72, 98, 14, 36.7)), qos=1
        )
        _say("w-alice", "HR 72, SpO2 98 %, RR 14, 36.7 °C (normal)")
        for spo2 in (96, 93, 89):
            client.publish(
                f"{PREFIX}/v1/w-bob/vitals", json.dumps(_vitals(now, 104, spo2, 22, 38.2)), qos=1
            )
            _say("w-bob", f"HR 104, SpO2 {spo2} %, RR 22, 38.2 °C (falling SpO2)")
        print("\ngateways ask:")
        questions = [
            ("w-alice", "q-1", "I feel dizzy when I stand up. Should I worry?", False),
            ("w-bob", "q-2", "I am short of breath. What should I do?", True),
        ]
        for wearer, qid, text, stream in questions:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"demo-{qid}".encode()
            client.publish(
                f"{PREFIX}/v1/{wearer}/query",
                json.dumps({"id": qid, "text": text, "stream": stream}),
                qos=1,
                properties=props,
            )
            _say(wearer, f"{qid}: {text}" + (" (streamed)" if stream else ""))
        client.publish(f"{PREFIX}/v1/w-alice/query", b'{"id": "q-3", "text": ', qos=1)
        _say("w-alice", "q-3: a truncated JSON message")
        print("\nedged answers:")
        return _print_replies(inbox, expected={"q-1", "q-2", "q-3"}, seconds=seconds)
    finally:
        client.loop_stop()
        client.disconnect()


def _print_replies(
    inbox: queue.Queue[tuple[str, bytes]], expected: set[str], seconds: float
) -> int:
    deadline = time.monotonic() + seconds
    chunks = 0
    pending = set(expected)
    while pending and time.monotonic() < deadline:
        try:
            topic, payload = inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        body = json.loads(payload)
        kind = topic.rsplit("/", 1)[-1]
        if kind == "stream":
            chunks += 1
        elif kind == "advice":
            pending.discard(body["id"])
            _show_advice(body, chunks)
            chunks = 0
        elif kind == "alert":
            _say("alert", f"{body['wearer']}: {body['severity']}: {body['message']}")
        elif kind == "error":
            pending.discard(body.get("id") or "q-3")
            _say("error", f"{body['code']}: {body['message']}")
        elif kind == "status":
            _say(
                "status",
                f"{body['state']}, queue {body['queue']}, {body.get('mem_available_mb')} MB free",
            )
    if pending:
        print(f"no reply within {seconds:.0f} s for: {', '.join(sorted(pending))}", file=sys.stderr)
        return 1
    return 0


def _show_advice(body: dict[str, Any], chunks: int) -> None:
    _say(
        "advice",
        f"{body['wearer']} {body['id']}: [{body['finish_reason']}, "
        f"{body['usage']['completion_tokens']} tokens, {body['timing_ms']['total']} ms]",
    )
    for line in textwrap.wrap(body["text"].replace("\n", " "), width=88):
        _say("", line)
    _say(
        "",
        f"triage: NEWS2 {body['triage']['news2']}, risk {body['triage']['risk']}"
        + (f"; escalation: {body['escalation']}" if body["escalation"] else ""),
    )
    if body.get("guard", {}).get("contradiction"):
        _say("", "guard: the text contradicted the triage; the escalation was put first")
    if chunks:
        _say("", f"(and {chunks} stream chunks before it)")
