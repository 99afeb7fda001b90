#!/usr/bin/env python3
"""Wearable gateway simulator and load generator for edged (MQTT contract v1, docs/mqtt-api.md).

    python tools/gateway_sim.py --port 1883 --wearers 20 --duration 60
    python tools/gateway_sim.py --port 1883 --wearers 5 --count 10 --deteriorating 2 --json out.json
    python tools/gateway_sim.py --port 1883 --count 50 --reply reply-to --invalid-every 10 --stream

N simulated wearers (`sim-0001`, ...) publish vitals summaries (valid, plausible values on a
random walk; `--deteriorating K` makes the first K wearers' SpO2 fall and their heart and
breathing rates rise) and queries, each at its own rate, for `--duration` seconds or until
`--count` queries are sent. Replies come back on the MQTT 5 Response Topic (with Correlation
Data), on the payload's `reply_to`, or on the default advice topic (`--reply`). After sending,
it waits for every query's final reply (advice or error) up to `--reply-timeout` seconds after
the last query and prints: sent / answered / errors by code / missing ids, reply latency
p50/p90/p99/max, and the vitals rate achieved; meanwhile a progress line goes to stderr every
second (`--progress-every`, 0 for none). Exit status 0 when every query got exactly the
reply it should (advice, or the error a deliberately invalid message asks for), 1 otherwise.

Against a share group (API.md v1.1) nothing changes on the sending side: queries go to the
usual `{prefix}/v1/{wearer}/query` topics and the broker spreads them over the group. The
report then says who did the work: advice replies per answering node (the advice's `node`
field), every query answered more than once and whether its copies are byte-identical (a
redelivery must re-send the stored reply, never a new generation), and alerts per raising
node and per wearer, with their distinct `alert_id`s (a duplicate alert carries the same id).

Importable: `run_simulation(host, port, wearers=..., count=...) -> SimResult`, for tests and
demos. It only talks to loopback brokers unless `allow_remote` / `--allow-remote` is given.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import json
import logging
import math
import random
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("gateway_sim")

ReplyMode = Literal["response-topic", "reply-to", "advice"]
REPLY_MODES: tuple[ReplyMode, ...] = ("response-topic", "reply-to", "advice")

MAX_EVENTS = 10_000_000
"""Hard bound on messages one run may publish, whatever the rates and duration."""
CONNECT_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 10.0
"""How long to wait, after sending, for the client's outgoing queue to reach the broker."""

QUESTIONS = (
    "I feel dizzy when I stand up. Should I worry?",
    "My chest feels tight after climbing the stairs. What should I do?",
    "I am short of breath this morning. Is that normal for me?",
    "My heart is racing while I rest. What could cause that?",
    "I have had a fever since yesterday. When should I call someone?",
    "I slept badly and feel very tired. Could it be my medication?",
    "My ankles are more swollen than usual. Is that a problem?",
    "I coughed a lot tonight. Should I use my inhaler?",
    "My watch says my oxygen is lower than yesterday. What does that mean?",
    "I feel a bit confused and my head hurts. What should I do?",
)


# -- vitals: a random walk per wearer ----------------------------------------------------------


@dataclass
class WearerState:
    """One wearer's current physiology; each summary moves it one random-walk step."""

    wearer: str
    deteriorating: bool
    heart_rate: float
    spo2: float
    resp_rate: float
    temp_c: float
    systolic_bp: float
    diastolic_bp: float
    hrv_rmssd_ms: float
    activity: str = "rest"


# Healthy resting ranges the walk stays in, and the floors/ceilings a deteriorating wearer
# drifts towards; all well inside the contract's plausible ranges (API.md), so every summary
# is valid.
_NORMAL = {
    "heart_rate": (55.0, 95.0),
    "spo2": (95.0, 99.0),
    "resp_rate": (12.0, 20.0),
    "temp_c": (36.2, 37.5),
    "systolic_bp": (105.0, 140.0),
    "diastolic_bp": (65.0, 90.0),
    "hrv_rmssd_ms": (20.0, 70.0),
}
_DETERIORATED = {"heart_rate": 130.0, "spo2": 84.0, "resp_rate": 28.0, "temp_c": 38.8}
_STEP = {
    "heart_rate": 2.0,
    "spo2": 0.4,
    "resp_rate": 0.6,
    "temp_c": 0.05,
    "systolic_bp": 2.0,
    "diastolic_bp": 1.5,
    "hrv_rmssd_ms": 2.0,
}
_DRIFT = {"heart_rate": 0.8, "spo2": -0.25, "resp_rate": 0.25, "temp_c": 0.02}
"""Per-summary drift of a deteriorating wearer towards `_DETERIORATED`."""
_ACTIVITIES = ("rest", "rest", "rest", "walk", "sleep")


def new_wearer(wearer: str, deteriorating: bool, rng: random.Random) -> WearerState:
    def pick(name: str) -> float:
        return rng.uniform(*_NORMAL[name])

    return WearerState(
        wearer,
        deteriorating,
        heart_rate=pick("heart_rate"),
        spo2=pick("spo2"),
        resp_rate=pick("resp_rate"),
        temp_c=pick("temp_c"),
        systolic_bp=pick("systolic_bp"),
        diastolic_bp=pick("diastolic_bp"),
        hrv_rmssd_ms=pick("hrv_rmssd_ms"),
    )


def step_vitals(state: WearerState, rng: random.Random) -> None:
    for name, step in _STEP.items():
        value = getattr(state, name) + rng.gauss(0.0, step)
        lo, hi = _NORMAL[name]
        if state.deteriorating and name in _DRIFT:
            value += _DRIFT[name]
            target = _DETERIORATED[name]
            lo, hi = (min(lo, target), max(hi, target))
        else:
            # Pull back towards the normal band: a walk that wanders off forever is not a person.
            mid = (lo + hi) / 2
            value += (mid - value) * 0.05
        setattr(state, name, min(max(value, lo), hi))
    if rng.random() < 0.05:
        state.activity = rng.choice(_ACTIVITIES)


def _stat(mean: float, spread: float, lo: float, hi: float, digits: int = 0) -> dict[str, float]:
    """{mean, min, max} rounded, clamped to [lo, hi], with min <= mean <= max."""
    m = round(min(max(mean, lo), hi), digits)
    return {
        "mean": m,
        "min": round(max(m - spread, lo), digits),
        "max": round(min(m + spread, hi), digits),
    }


def vitals_summary(state: WearerState, rng: random.Random, now: float) -> dict[str, Any]:
    """A valid v1 vitals summary of `state` over the last 60 s."""
    hr_spread = rng.uniform(3, 12)
    steps = 0 if state.activity in ("rest", "sleep") else rng.randint(20, 120)
    events = ["irregular_rhythm"] if state.heart_rate > 120 and rng.random() < 0.1 else []
    return {
        "ts": int(now),
        "window_s": 60,
        "heart_rate": _stat(state.heart_rate, hr_spread, 20, 300),
        "spo2": {
            "mean": round(state.spo2, 0),
            "min": round(max(state.spo2 - rng.uniform(0, 2), 50), 0),
        },
        "resp_rate": round(state.resp_rate, 0),
        "temp_c": round(state.temp_c, 1),
        "systolic_bp": round(state.systolic_bp),
        "diastolic_bp": round(state.diastolic_bp),
        "hrv_rmssd_ms": round(state.hrv_rmssd_ms, 1),
        "steps": steps,
        "activity": state.activity,
        "on_oxygen": False,
        "spo2_scale": 1,
        "consciousness": "alert",
        "events": events,
    }


# -- deliberately invalid messages ------------------------------------------------------------

# What each deliberately broken query is, and the error code the contract says it must get.
_INVALID_QUERIES: tuple[tuple[str, str], ...] = (
    ("max_tokens_zero", "out_of_range"),
    ("text_missing", "invalid_schema"),
    ("bad_priority", "invalid_schema"),
    ("truncated_json", "invalid_json"),
)


def invalid_query(kind: str, query_id: str, reply_to: str | None = None) -> bytes:
    """A query broken as `kind` says; `reply_to` is kept so that the error can be routed."""
    extra = {"reply_to": reply_to} if reply_to is not None else {}
    if kind == "max_tokens_zero":
        return json.dumps({"id": query_id, "text": "hello", "max_tokens": 0, **extra}).encode()
    if kind == "text_missing":
        return json.dumps({"id": query_id, **extra}).encode()
    if kind == "bad_priority":
        body = {"id": query_id, "text": "hello", "priority": "sometimes", **extra}
        return json.dumps(body).encode()
    if kind == "truncated_json":
        return f'{{"id": "{query_id}", "text": '.encode()
    raise ValueError(f"unknown invalid query kind {kind!r}")


def invalid_vitals(now: float) -> bytes:
    # spo2.min above 100: out_of_range naming spo2.min (API.md's own example).
    return json.dumps({"ts": int(now), "spo2": {"mean": 97, "min": 130}}).encode()


# -- results ----------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every value reported was measured)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(values_ms: list[float]) -> dict[str, float | int | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 2)

    return {
        "n": len(values_ms),
        "p50": r(percentile(values_ms, 50)),
        "p90": r(percentile(values_ms, 90)),
        "p99": r(percentile(values_ms, 99)),
        "max": r(max(values_ms) if values_ms else None),
        "mean": r(sum(values_ms) / len(values_ms) if values_ms else None),
    }


@dataclass
class SimResult:
    wearers: int
    reply_mode: str
    send_s: float
    """Length of the sending phase."""
    wall_s: float
    """Whole run: connect, send, wait for replies, disconnect."""
    queries_sent: int = 0
    invalid_queries_sent: int = 0
    """Queries broken on purpose; each must get its expected error code."""
    answered: int = 0
    """Queries whose final reply arrived (advice or error)."""
    advice: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Final error replies by code, including the expected ones."""
    finish_reasons: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    """wearer/id of queries that got no final reply within the timeout."""
    unexpected: list[str] = field(default_factory=list)
    """Replies that were not what the query asked for (an error other than `busy` on a valid
    query, the wrong code on an invalid one, advice on an invalid one), as `wearer/id: what`.
    `busy` is the contract's backpressure, counted in `errors` but not unexpected."""
    duplicate_replies: int = 0
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    """Queries answered more than once: `query` (wearer/id), `copies` (replies beyond the
    first), `identical` (every copy byte-identical to the first), `nodes` (who sent each reply,
    the first one first)."""
    answers_by_node: dict[str, int] = field(default_factory=dict)
    """Advice replies by the `node` that answered (first replies only, so the counts add up to
    `advice`); `unknown` for advice without a `node`."""
    answered_while_sending: int = 0
    """Advice replies that arrived before the sending phase ended: with a load above the
    daemons' capacity, divided by `send_s` it is their throughput."""
    unmatched_replies: int = 0
    """Replies on our topics that match no query of this run."""
    latency_ms: dict[str, Any] = field(default_factory=dict)
    """Publish of a query to receipt of its final advice."""
    error_latency_ms: dict[str, Any] = field(default_factory=dict)
    """Publish of a query to receipt of its final error."""
    vitals_sent: int = 0
    invalid_vitals_sent: int = 0
    vitals_errors: int = 0
    """Errors received on the wearers' error topics about vitals."""
    vitals_rate: float = 0.0
    """Vitals summaries published per second over the sending phase."""
    alerts: int = 0
    alerts_by_node: dict[str, int] = field(default_factory=dict)
    """Alerts by the `node` that raised them (`unknown` without one)."""
    alerts_by_wearer: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per alerting wearer: `alerts` received, distinct `alert_ids`, and the `nodes` that
    raised them (in a share group exactly one live node raises a wearer's alerts)."""
    duplicate_alerts: int = 0
    """Alerts whose `alert_id` had already arrived (a consumer drops them)."""
    stream_chunks: int = 0
    stream_mismatches: list[str] = field(default_factory=list)
    """Streamed queries whose chunks do not number 0.. in order or do not concatenate to the
    final advice text (chunks are QoS 0: a loaded broker may drop some)."""

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.unexpected
            or self.duplicate_replies
            or self.vitals_errors != self.invalid_vitals_sent
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class _Pending:
    wearer: str
    query_id: str
    sent_at: float
    expect: str
    """`advice` or the error code a deliberately invalid query must get."""
    stream: bool
    replied_at: float | None = None
    chunks: dict[int, str] = field(default_factory=dict)
    reply: bytes = b""
    """The first final reply, as received: later copies are compared with it."""
    nodes: list[str] = field(default_factory=list)
    """Who sent each final reply (advice names its node; an error names none)."""
    identical: bool = True
    """Every later copy of the final reply was byte-identical to the first."""


# -- the simulation ---------------------------------------------------------------------------


class SimulationError(RuntimeError):
    pass


UNKNOWN_NODE = "unknown"


def _node_of(body: dict[str, Any]) -> str:
    """The node that sent a reply or an alert (API.md v1.1 `node`), as a counting key."""
    node = body.get("node")
    return node if isinstance(node, str) and node else UNKNOWN_NODE


@dataclass
class _Heartbeat:
    """Says how the run is going every `every_s` seconds while it sleeps or waits: a long run
    must show that it is moving. Silent without `say`."""

    say: Callable[[str], None] | None
    every_s: float
    next_at: float = 0.0

    def _beat(self, now: float, line: Callable[[], str]) -> None:
        if self.say is not None and now >= self.next_at:
            self.say(line())
            self.next_at = now + self.every_s

    def sleep_until(self, due: float, line: Callable[[], str]) -> None:
        while True:
            now = time.perf_counter()
            self._beat(now, line)
            if now >= due:
                return
            wake = due if self.say is None else min(due, self.next_at)
            time.sleep(max(0.0, wake - now))

    def wait(self, event: threading.Event, due: float, line: Callable[[], str]) -> None:
        """Wait for `event` until perf_counter() reaches `due`."""
        while not event.is_set():
            now = time.perf_counter()
            self._beat(now, line)
            if now >= due:
                return
            event.wait(max(0.0, (due if self.say is None else min(due, self.next_at)) - now))


def check_loopback(host: str) -> None:
    """Raise SimulationError unless every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        raise SimulationError(f"cannot resolve host {host!r}: {exc}") from None
    addresses = {str(info[4][0]) for info in infos}
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise SimulationError(
            f"host {host!r} resolves to non-loopback {', '.join(remote)}; pass allow_remote "
            "(--allow-remote) to load a broker that is not on this machine"
        )


class _Gateway:
    """One MQTT 5 client speaking for every simulated wearer; collects the replies."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        run_tag: str,
        reply_mode: ReplyMode,
        stream: bool,
        wearers: set[str],
    ) -> None:
        self.prefix = prefix
        self.wearers = wearers
        """Only messages about these wearers count: the broker may serve other gateways."""
        self.base = f"{prefix}/v1/"
        self.run_tag = run_tag
        self.reply_mode = reply_mode
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.advice_ms: list[float] = []
        self.error_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.duplicates = 0
        self.answers_by_node: Counter[str] = Counter()
        self.sending = True
        """Cleared when the sending phase ends; advice before that is `answered_while_sending`."""
        self.answered_while_sending = 0
        self.unmatched = 0
        self.vitals_errors = 0
        self.alerts = 0
        self.alerts_by_node: Counter[str] = Counter()
        self.alert_ids: dict[str, Counter[str]] = {}
        """Per wearer: how often each alert_id arrived."""
        self.alert_nodes: dict[str, set[str]] = {}
        self.chunks = 0
        self.stream_mismatches: list[str] = []
        self.outstanding = 0
        self.answered = 0
        self._last_publish: mqtt.MQTTMessageInfo | None = None
        self.all_answered = threading.Event()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"edged-sim-{run_tag}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._subscribed.set()
        self.client.on_message = self._on_message
        subs = [f"{self.base}+/error", f"{self.base}+/alert"]
        reply = self.reply_filter()
        subs.append(reply)
        if stream:
            subs.append(reply + "/stream")
        self._subscriptions = subs
        self.client.connect(host, port, keepalive=30, clean_start=True)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            # Nagle + delayed ACK add tens of ms per small publish on loopback.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        if not (
            self._connected.wait(CONNECT_TIMEOUT_S) and self._subscribed.wait(CONNECT_TIMEOUT_S)
        ):
            self.close()
            raise SimulationError(
                f"broker {host}:{port} did not accept the connection and "
                f"subscriptions within {CONNECT_TIMEOUT_S:.0f} s"
            )

    def reply_topic(self, wearer: str) -> str:
        if self.reply_mode == "advice":
            return f"{self.base}{wearer}/advice"
        return f"{self.base}{wearer}/sim/{self.run_tag}"

    def reply_filter(self) -> str:
        if self.reply_mode == "advice":
            return f"{self.base}+/advice"
        return f"{self.base}+/sim/{self.run_tag}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- network thread --------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason_code: Any,
        properties: object,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe([(topic, 1) for topic in self._subscriptions])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        topic = msg.topic
        if not topic.startswith(self.base):
            return
        levels = topic[len(self.base) :].split("/")
        wearer = levels[0]
        if wearer not in self.wearers:
            return
        try:
            body = json.loads(msg.payload)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            log.warning("unreadable payload on %s", topic)
            with self.lock:
                self.unmatched += 1
            return
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props else None
        kind = levels[-1]
        with self.lock:
            if kind == "alert":
                self._on_alert(wearer, body)
            elif kind == "stream":
                self._on_chunk(wearer, body)
            elif kind == "error" and correlation is None and body.get("id") is None:
                # An error naming no query and carrying no Correlation Data: about vitals.
                self.vitals_errors += 1
            else:
                self._on_final(wearer, body, correlation, now, bytes(msg.payload))

    def _key(
        self, wearer: str, body: dict[str, Any], correlation: bytes | None
    ) -> tuple[str, str] | None:
        if correlation is not None:
            text = bytes(correlation).decode("utf-8", "replace")
            cwearer, _, cid = text.partition("/")
            return (cwearer, cid)
        qid = body.get("id")
        return (wearer, qid) if isinstance(qid, str) else None

    def _on_chunk(self, wearer: str, body: dict[str, Any]) -> None:
        self.chunks += 1
        item = self.pending.get((wearer, str(body.get("id"))))
        if item is not None and isinstance(body.get("seq"), int):
            item.chunks[body["seq"]] = str(body.get("delta", ""))

    def _on_alert(self, wearer: str, body: dict[str, Any]) -> None:
        self.alerts += 1
        node = _node_of(body)
        self.alerts_by_node[node] += 1
        self.alert_nodes.setdefault(wearer, set()).add(node)
        self.alert_ids.setdefault(wearer, Counter())[str(body.get("alert_id"))] += 1

    def _on_final(
        self,
        wearer: str,
        body: dict[str, Any],
        correlation: bytes | None,
        now: float,
        payload: bytes,
    ) -> None:
        key = self._key(wearer, body, correlation)
        item = self.pending.get(key) if key is not None else None
        if item is None:
            self.unmatched += 1
            return
        node = _node_of(body)
        item.nodes.append(node)
        if item.replied_at is not None:
            self.duplicates += 1
            item.identical = item.identical and payload == item.reply
            return
        item.replied_at = now
        item.reply = payload
        self.answered += 1
        elapsed_ms = (now - item.sent_at) * 1000
        name = f"{item.wearer}/{item.query_id}"
        if "code" in body:
            code = str(body["code"])
            self.errors[code] += 1
            self.error_ms.append(elapsed_ms)
            if code != item.expect and not (code == "busy" and item.expect == "advice"):
                self.unexpected.append(
                    f"{name}: error {code} ({body.get('message')}), expected {item.expect}"
                )
        else:
            self.finish[str(body.get("finish_reason"))] += 1
            self.advice_ms.append(elapsed_ms)
            self.answers_by_node[node] += 1
            if self.sending:
                self.answered_while_sending += 1
            if item.expect != "advice":
                self.unexpected.append(f"{name}: advice, expected error {item.expect}")
            elif item.stream:
                self._check_stream(item, str(body.get("text", "")))
        self.outstanding -= 1
        if self.outstanding == 0:
            self.all_answered.set()

    def _check_stream(self, item: _Pending, text: str) -> None:
        # Checked when the final reply arrives: the daemon publishes every chunk before it and
        # mosquitto forwards one client's messages in order, so all chunks are here unless a
        # QoS 0 chunk was dropped on the way.
        seqs = sorted(item.chunks)
        joined = "".join(item.chunks[s] for s in seqs)
        if seqs != list(range(len(seqs))) or joined != text:
            self.stream_mismatches.append(f"{item.wearer}/{item.query_id}")

    # -- publishing (caller's thread) ------------------------------------------------------

    def send_query(
        self, wearer: str, query_id: str, payload: bytes, expect: str, stream: bool
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if self.reply_mode == "response-topic":
            props.ResponseTopic = self.reply_topic(wearer)
            props.CorrelationData = f"{wearer}/{query_id}".encode()
        with self.lock:
            self.pending[(wearer, query_id)] = _Pending(
                wearer, query_id, time.perf_counter(), expect, stream
            )
            self.outstanding += 1
            self.all_answered.clear()
        self._last_publish = self.client.publish(
            f"{self.base}{wearer}/query", payload, qos=1, properties=props
        )

    def send_vitals(self, wearer: str, payload: bytes, qos: int) -> None:
        self._last_publish = self.client.publish(f"{self.base}{wearer}/vitals", payload, qos=qos)

    def wait_flushed(self, timeout: float) -> bool:
        """Wait until the last publish has left (QoS 0) or been acknowledged (QoS 1); paho
        sends in order, so everything before it has left too."""
        last = self._last_publish
        if last is None:
            return True
        try:
            last.wait_for_publish(timeout)
        except RuntimeError:  # the connection is gone: nothing more will leave
            return False
        return last.is_published()


def _duplicate(item: _Pending) -> dict[str, Any]:
    return {
        "query": f"{item.wearer}/{item.query_id}",
        "copies": len(item.nodes) - 1,
        "identical": item.identical,
        "nodes": list(item.nodes),
    }


def _query_payload(
    query_id: str,
    text: str,
    gateway: _Gateway,
    wearer: str,
    max_tokens: int,
    stream: bool,
    deadline_s: float | None,
    priority: str,
) -> bytes:
    body: dict[str, Any] = {
        "id": query_id,
        "text": text,
        "max_tokens": max_tokens,
        "stream": stream,
        "priority": priority,
    }
    if deadline_s is not None:
        body["deadline_s"] = deadline_s
    if gateway.reply_mode == "reply-to":
        body["reply_to"] = gateway.reply_topic(wearer)
    return json.dumps(body).encode()


def run_simulation(
    host: str,
    port: int,
    *,
    wearers: int = 10,
    vitals_rate: float = 1.0,
    query_rate: float = 0.05,
    duration_s: float | None = None,
    count: int | None = None,
    reply_mode: ReplyMode = "response-topic",
    deteriorating: int = 0,
    max_tokens: int = 32,
    stream: bool = False,
    deadline_s: float | None = None,
    urgent_deteriorating: bool = True,
    invalid_every: int = 0,
    invalid_vitals_every: int = 0,
    vitals_qos: int = 0,
    reply_timeout_s: float = 60.0,
    prefix: str = "edged",
    seed: int | None = None,
    allow_remote: bool = False,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 1.0,
) -> SimResult:
    """Run one simulation against the broker at host:port and return what happened.

    `vitals_rate` and `query_rate` are per wearer, per second. Exactly one of `duration_s`
    (send for that long) and `count` (send that many queries in total, then stop; vitals flow
    meanwhile) must be given. `invalid_every` N: every Nth query is broken on purpose (cycling
    through out_of_range, invalid_schema and, when the reply can still be routed,
    invalid_json) and must get that error; `invalid_vitals_every` N likewise for vitals
    (out_of_range on spo2.min). Queries of deteriorating wearers are `urgent` unless
    `urgent_deteriorating` is False. Returns after every query is answered or
    `reply_timeout_s` has passed since the last one was sent. `progress`, if given, gets a
    line every `progress_every_s` seconds (sent, answered) while the run sleeps or waits.
    """
    if (duration_s is None) == (count is None):
        raise ValueError("give exactly one of duration_s and count")
    if duration_s is not None and not 0 < duration_s <= 86400:
        raise ValueError(f"duration_s = {duration_s} must be in (0, 86400]")
    if count is not None and count < 0:
        raise ValueError(f"count = {count} must be >= 0")
    if count and query_rate <= 0:
        raise ValueError("count needs query_rate > 0")
    if not 1 <= wearers <= 9999:
        raise ValueError(f"wearers = {wearers} must be in 1..9999")
    if vitals_rate < 0 or query_rate < 0:
        raise ValueError("rates must be >= 0")
    if reply_mode not in REPLY_MODES:
        raise ValueError(f"reply_mode = {reply_mode!r} is not one of {', '.join(REPLY_MODES)}")
    if not allow_remote:
        check_loopback(host)

    rng = random.Random(seed)
    run_tag = (
        uuid.UUID(int=rng.getrandbits(128)).hex[:8] if seed is not None else uuid.uuid4().hex[:8]
    )
    names = [f"sim-{i + 1:04d}" for i in range(wearers)]
    states = {n: new_wearer(n, i < deteriorating, rng) for i, n in enumerate(names)}
    invalid_kinds = [
        k for k in _INVALID_QUERIES if k[1] != "invalid_json" or reply_mode == "response-topic"
    ]
    # Without a Response Topic an invalid_json error cannot name its query: leave it out.

    started = time.perf_counter()
    gateway = _Gateway(host, port, prefix, run_tag, reply_mode, stream, set(names))
    result = SimResult(wearers=wearers, reply_mode=reply_mode, send_s=0.0, wall_s=0.0)
    beat = _Heartbeat(progress, progress_every_s)

    def status() -> str:
        elapsed = time.perf_counter() - started
        span = f"{elapsed:.0f}/{duration_s:g} s" if duration_s is not None else f"{elapsed:.0f} s"
        sent = f"{result.queries_sent}/{count}" if count is not None else f"{result.queries_sent}"
        return (
            f"gateway_sim: {span}, {result.vitals_sent} vitals, {sent} queries sent, "
            f"{gateway.answered} answered"
        )

    try:
        # Event schedule: (due time, sequence, kind, wearer). Each wearer starts at a random
        # phase so N wearers at 1/s are spread over the second, not a burst of N.
        events: list[tuple[float, int, str, str]] = []
        seq = 0
        t0 = time.perf_counter() + 0.05
        for name in names:
            for kind, rate in (("vitals", vitals_rate), ("query", query_rate)):
                if rate > 0:
                    events.append((t0 + rng.uniform(0, 1 / rate), seq, kind, name))
                    seq += 1
        heapq.heapify(events)
        if duration_s is not None:
            end, queries_to_send = t0 + duration_s, MAX_EVENTS
        else:
            assert count is not None
            # Twice the time `count` queries should take, plus slack: the bound on a count run.
            end = t0 + 2 * count / (query_rate * wearers) + 10 if count else t0
            queries_to_send = count
        sent_events = 0
        while events and sent_events < MAX_EVENTS and result.queries_sent < queries_to_send:
            due, _, kind, name = heapq.heappop(events)
            if due >= end:
                break  # the heap's earliest event is past the end: so is every other
            beat.sleep_until(due, status)
            rate = vitals_rate if kind == "vitals" else query_rate
            # +/-10 % jitter on every period, so wearers do not stay in lock-step.
            heapq.heappush(events, (due + rng.uniform(0.9, 1.1) / rate, seq, kind, name))
            seq += 1
            sent_events += 1
            now = time.time()
            if kind == "vitals":
                result.vitals_sent += 1
                if invalid_vitals_every and result.vitals_sent % invalid_vitals_every == 0:
                    result.invalid_vitals_sent += 1
                    gateway.send_vitals(name, invalid_vitals(now), vitals_qos)
                else:
                    step_vitals(states[name], rng)
                    payload = json.dumps(vitals_summary(states[name], rng, now)).encode()
                    gateway.send_vitals(name, payload, vitals_qos)
                continue
            result.queries_sent += 1
            query_id = f"q-{run_tag}-{result.queries_sent:06d}"
            if invalid_every and result.queries_sent % invalid_every == 0 and invalid_kinds:
                bad, code = invalid_kinds[result.invalid_queries_sent % len(invalid_kinds)]
                result.invalid_queries_sent += 1
                reply_to = gateway.reply_topic(name) if reply_mode == "reply-to" else None
                payload = invalid_query(bad, query_id, reply_to)
                gateway.send_query(name, query_id, payload, code, False)
                continue
            priority = "urgent" if states[name].deteriorating and urgent_deteriorating else "normal"
            payload = _query_payload(
                query_id,
                rng.choice(QUESTIONS),
                gateway,
                name,
                max_tokens,
                stream,
                deadline_s,
                priority,
            )
            gateway.send_query(name, query_id, payload, "advice", stream)
        send_end = time.perf_counter()
        with gateway.lock:
            gateway.sending = False
        result.send_s = send_end - t0
        if not gateway.wait_flushed(DRAIN_TIMEOUT_S):
            log.warning("not every message reached the broker within %.0f s", DRAIN_TIMEOUT_S)
        if result.queries_sent:
            beat.wait(
                gateway.all_answered,
                send_end + reply_timeout_s,
                lambda: f"{status()} (waiting up to {reply_timeout_s:g} s for the rest)",
            )
        # Replies about vitals have no query to wait for: give the last ones a moment.
        if result.invalid_vitals_sent:
            deadline = time.monotonic() + 2.0
            while (
                gateway.vitals_errors < result.invalid_vitals_sent and time.monotonic() < deadline
            ):
                time.sleep(0.02)
    finally:
        gateway.close()
    with gateway.lock:
        items = list(gateway.pending.values())
        result.answered = sum(1 for p in items if p.replied_at is not None)
        result.advice = len(gateway.advice_ms)
        result.errors = dict(sorted(gateway.errors.items()))
        result.finish_reasons = dict(sorted(gateway.finish.items()))
        result.missing = sorted(f"{p.wearer}/{p.query_id}" for p in items if p.replied_at is None)
        result.unexpected = list(gateway.unexpected)
        result.duplicate_replies = gateway.duplicates
        result.duplicates = [_duplicate(p) for p in items if len(p.nodes) > 1]
        result.answers_by_node = dict(sorted(gateway.answers_by_node.items()))
        result.answered_while_sending = gateway.answered_while_sending
        result.unmatched_replies = gateway.unmatched
        result.latency_ms = latency_summary(gateway.advice_ms)
        result.error_latency_ms = latency_summary(gateway.error_ms)
        result.vitals_errors = gateway.vitals_errors
        result.alerts = gateway.alerts
        result.alerts_by_node = dict(sorted(gateway.alerts_by_node.items()))
        result.alerts_by_wearer = {
            wearer: {
                "alerts": sum(ids.values()),
                "alert_ids": len(ids),
                "nodes": sorted(gateway.alert_nodes[wearer]),
            }
            for wearer, ids in sorted(gateway.alert_ids.items())
        }
        result.duplicate_alerts = sum(
            sum(ids.values()) - len(ids) for ids in gateway.alert_ids.values()
        )
        result.stream_chunks = gateway.chunks
        result.stream_mismatches = list(gateway.stream_mismatches)
    result.vitals_rate = round(result.vitals_sent / result.send_s, 1) if result.send_s > 0 else 0.0
    result.send_s = round(result.send_s, 3)
    result.wall_s = round(time.perf_counter() - started, 3)
    return result


# -- command line -----------------------------------------------------------------------------


def format_report(r: SimResult) -> str:
    def ms(summary: dict[str, Any], key: str) -> str:
        value = summary.get(key)
        return "-" if value is None else f"{value:.1f}"

    errors = ", ".join(f"{code} {n}" for code, n in r.errors.items()) or "none"
    lines = [
        f"wearers        {r.wearers} ({r.reply_mode}), sent for {r.send_s:.1f} s, "
        f"whole run {r.wall_s:.1f} s",
        f"queries        sent {r.queries_sent} (invalid on purpose {r.invalid_queries_sent}), "
        f"answered {r.answered} (advice {r.advice}), missing {len(r.missing)}",
        f"errors         {errors}",
        f"finish         {', '.join(f'{k} {n}' for k, n in r.finish_reasons.items()) or '-'}",
        "latency ms     "
        + "  ".join(f"{k} {ms(r.latency_ms, k)}" for k in ("p50", "p90", "p99", "max"))
        + f"   (advice, n={r.latency_ms.get('n', 0)})",
        "               "
        + "  ".join(f"{k} {ms(r.error_latency_ms, k)}" for k in ("p50", "p90", "p99", "max"))
        + f"   (errors, n={r.error_latency_ms.get('n', 0)})",
        f"vitals         sent {r.vitals_sent} at {r.vitals_rate:.1f}/s "
        f"(invalid on purpose {r.invalid_vitals_sent}, errors back {r.vitals_errors})",
        f"alerts         {r.alerts}",
    ]
    lines += _group_lines(r)
    if r.stream_chunks or r.stream_mismatches:
        lines.append(
            f"stream         {r.stream_chunks} chunks, "
            f"{len(r.stream_mismatches)} queries with gaps or a text mismatch"
        )
    if r.duplicate_replies or r.unmatched_replies:
        lines.append(
            f"extra replies  duplicates {r.duplicate_replies}, unmatched {r.unmatched_replies}"
        )
    if r.missing:
        shown = ", ".join(r.missing[:20]) + (" ..." if len(r.missing) > 20 else "")
        lines.append(f"missing        {shown}")
    for line in r.unexpected[:20]:
        lines.append(f"unexpected     {line}")
    lines.append(f"result         {'OK' if r.ok else 'FAILED'}")
    return "\n".join(lines)


def _counts(by: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in by.items()) or "-"


def _group_lines(r: SimResult) -> list[str]:
    """Who did the work: answers and alerts per node, and what arrived more than once."""
    lines = [f"answers by     {_counts(r.answers_by_node)}"]
    if r.alerts:
        split = sum(1 for w in r.alerts_by_wearer.values() if len(w["nodes"]) > 1)
        lines.append(
            f"alerts by      {_counts(r.alerts_by_node)}; {len(r.alerts_by_wearer)} wearers, "
            f"{split} raised by more than one node, {r.duplicate_alerts} repeated alert_ids"
        )
    if r.duplicates:
        same = sum(1 for d in r.duplicates if d["identical"])
        lines.append(
            f"duplicates     {len(r.duplicates)} queries answered more than once, "
            f"{same} with byte-identical copies"
        )
        for d in r.duplicates[:10]:
            copies = "identical" if d["identical"] else "DIFFERENT"
            lines.append(f"               {d['query']}: {copies}, from {', '.join(d['nodes'])}")
    return lines


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="broker host (loopback only, see --allow-remote)"
    )
    p.add_argument("--port", type=int, required=True, help="broker port")
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a broker that is not on this machine"
    )
    p.add_argument("--prefix", default="edged", help="topic prefix of the daemon")
    p.add_argument("--wearers", type=int, default=10, help="simulated wearers (sim-0001, ...)")
    p.add_argument(
        "--vitals-rate", type=float, default=1.0, help="vitals summaries per second, per wearer"
    )
    p.add_argument("--vitals-qos", type=int, choices=(0, 1), default=0)
    p.add_argument("--query-rate", type=float, default=0.05, help="queries per second, per wearer")
    how_long = p.add_mutually_exclusive_group(required=True)
    how_long.add_argument("--duration", type=float, help="send for this many seconds")
    how_long.add_argument("--count", type=int, help="send this many queries in total, then stop")
    p.add_argument(
        "--reply",
        choices=REPLY_MODES,
        default="response-topic",
        help="where replies go: MQTT 5 Response Topic + Correlation Data, the "
        "payload's reply_to, or the default advice topic",
    )
    p.add_argument(
        "--deteriorating",
        type=int,
        default=0,
        help="the first K wearers deteriorate (SpO2 falls, HR and RR rise)",
    )
    p.add_argument(
        "--no-urgent",
        action="store_true",
        help="deteriorating wearers ask with priority normal, not urgent",
    )
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every query")
    p.add_argument("--stream", action="store_true", help="ask for streamed answers")
    p.add_argument("--deadline", type=float, default=None, help="deadline_s of every query")
    p.add_argument(
        "--invalid-every",
        type=int,
        default=0,
        help="every Nth query is invalid on purpose and must get its error",
    )
    p.add_argument(
        "--invalid-vitals-every",
        type=int,
        default=0,
        help="every Nth vitals summary is invalid on purpose (spo2.min = 130)",
    )
    p.add_argument(
        "--reply-timeout",
        type=float,
        default=60.0,
        help="after the last query, wait this long for replies",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible vitals)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--progress-every",
        type=float,
        default=1.0,
        help="a progress line on stderr this often, in seconds (0: none)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = run_simulation(
            args.host,
            args.port,
            wearers=args.wearers,
            vitals_rate=args.vitals_rate,
            query_rate=args.query_rate,
            duration_s=args.duration,
            count=args.count,
            reply_mode=args.reply,
            deteriorating=args.deteriorating,
            max_tokens=args.max_tokens,
            stream=args.stream,
            deadline_s=args.deadline,
            urgent_deteriorating=not args.no_urgent,
            invalid_every=args.invalid_every,
            invalid_vitals_every=args.invalid_vitals_every,
            vitals_qos=args.vitals_qos,
            reply_timeout_s=args.reply_timeout,
            prefix=args.prefix,
            seed=args.seed,
            allow_remote=args.allow_remote,
            progress=_stderr if args.progress_every > 0 else None,
            progress_every_s=args.progress_every,
        )
    except (SimulationError, ValueError, OSError) as exc:
        print(f"gateway_sim: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
