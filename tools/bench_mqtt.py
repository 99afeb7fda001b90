#!/usr/bin/env python3
"""What the MQTT path costs: query latency through mosquitto and the daemon vs the bare engine,
and how many vitals summaries a second the daemon validates and routes.

    python tools/bench_mqtt.py                         # bundled test model, about a minute
    python tools/bench_mqtt.py --model DIR --samples 50 --max-tokens 64 --json bench-mqtt.json

Everything runs on this machine: a private mosquitto on a free loopback port (PrivateBroker)
and the real daemon in this process (`Daemon`, state in a temporary directory).

(a)/(b) Query overhead. The same query texts go, one outstanding at a time, (a) as MQTT 5
queries (Response Topic + Correlation Data, QoS 1) from a paho client to the daemon, timed
from publish to receipt of the final advice, and (b) straight to `daemon.engine.chat()` with
the daemon's system prompt, messages and GenerationConfig (as `Daemon._run_job` builds them).
The two paths alternate per text, after a warmup, so drift hits both alike; greedy decoding
makes both generate the same tokens. The overhead is p50(a) - p50(b); the target is at most
5 ms or 2 % of p50(b), whichever is larger.

(c) Vitals ingestion. N valid summaries are published at QoS 0, then at QoS 1, by separate
`mosquitto_pub -l` processes reading pre-built lines (tens of thousands a second each, so the
publishers are not what is measured); the daemon's `counters.vitals` is sampled every few ms.
Rate = summaries counted / time from the first to the last one counted; the CPU time of the
daemon's network thread (which parses, validates and routes every message) gives summaries per
CPU-second, i.e. what one core sustains. Target: 5,000 summaries/s.

stdout gets the results (JSON, then tables); progress goes to stderr, a line a second at most
(`--progress-every`, 0 for none).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config.loader import parse_config
from edged.engine import GenerationConfig
from edged.models import TINY_QWEN3_INT4
from edged.service.answer_store import AnswerStore
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = TINY_QWEN3_INT4

OVERHEAD_TARGET_MS = 5.0
OVERHEAD_TARGET_FRACTION = 0.02
VITALS_TARGET_PER_S = 5000.0
REPLY_TIMEOUT_S = 120.0
"""Longest wait for one query's reply (a real model on a small board is slow)."""
INGEST_IDLE_TIMEOUT_S = 5.0
"""Stop waiting for vitals once the daemon's counter has not moved for this long."""
INGEST_TIMEOUT_S = 120.0
SAMPLE_EVERY_S = 0.002
WEARER = "bench"


class Progress:
    """Progress lines on stderr, at most one per `every_s` seconds, so that a minutes-long run
    shows it is moving; stdout stays the results alone. `every_s` 0: silent."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._next = 0.0

    def say(self, line: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.every_s > 0 and (force or now >= self._next):
            print(f"bench_mqtt: {line}", file=sys.stderr, flush=True)
            self._next = now + self.every_s


QUIET = Progress(0)

_SUBJECTS = (
    "dizzy when I stand up",
    "short of breath on the stairs",
    "a racing heart at rest",
    "a fever since yesterday",
    "swollen ankles",
    "a tight chest",
    "a dry cough at night",
    "a headache and blurred vision",
    "tired all day",
    "pain in my left arm",
)
_ASKS = (
    "Should I worry?",
    "What should I do now?",
    "Do I need to call my nurse?",
    "Is this related to my medication?",
    "Can I wait until tomorrow?",
)


def query_texts(n: int) -> list[str]:
    """n distinct, plausible questions (distinct so no path profits from a cached prompt)."""
    return [
        f"Since {2 + i % 7} hours I have {_SUBJECTS[i % len(_SUBJECTS)]}. "
        f"{_ASKS[(i // len(_SUBJECTS)) % len(_ASKS)]} (#{i})"
        for i in range(n)
    ]


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * p / 100)) - 1]


def summary(values: list[float]) -> dict[str, float | int | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "n": len(values),
        "p50": r(pct(values, 50)),
        "p90": r(pct(values, 90)),
        "max": r(max(values) if values else None),
        "mean": r(statistics.fmean(values) if values else None),
    }


# -- (a) and (b): query latency --------------------------------------------------------------


class ReplyCollector:
    """A gateway's MQTT 5 client: one query outstanding, its final reply timed on arrival."""

    def __init__(self, port: int, reply_topic: str) -> None:
        self.reply_topic = reply_topic
        self._lock = threading.Lock()
        self._waiting: bytes | None = None
        self._arrived = threading.Event()
        self._reply: tuple[float, bytes] | None = None
        self._ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"bench-gw-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._ready.set()
        self.client.connect("127.0.0.1", port, keepalive=60, clean_start=True)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            # The daemon and mosquitto set TCP_NODELAY; a gateway that does not pays ~40 ms of
            # Nagle + delayed ACK per small publish, which is not the daemon's overhead.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe(reply_topic, qos=1)
        if not self._ready.wait(10):
            raise RuntimeError("the bench client could not subscribe within 10 s")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props else None
        with self._lock:
            if correlation is not None and bytes(correlation) == self._waiting:
                self._reply = (now, bytes(msg.payload))
                self._arrived.set()

    def ask(self, wearer: str, query: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Publish one query and wait for its final reply: (seconds, reply payload)."""
        correlation = query["id"].encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        payload = json.dumps(query).encode()
        with self._lock:
            self._waiting = correlation
            self._reply = None
            self._arrived.clear()
        started = time.perf_counter()
        self.client.publish(f"edged/v1/{wearer}/query", payload, qos=1, properties=props)
        if not self._arrived.wait(REPLY_TIMEOUT_S):
            raise RuntimeError(f"no reply to query {query['id']} within {REPLY_TIMEOUT_S:.0f} s")
        assert self._reply is not None
        arrived, body = self._reply
        return arrived - started, json.loads(body)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class GatewayProcess:
    """`ReplyCollector` in a process of its own, as a gateway is in the field: its paho thread
    then never waits for the daemon's GIL, nor the daemon for its. Same `ask` as in-process;
    one JSON line each way per query."""

    def __init__(self, port: int, reply_topic: str) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--gateway-worker",
                str(port),
                reply_topic,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="bench-gateway-reader", daemon=True).start()
        self._expect("ready", 15.0)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # end of output: the worker exited

    def _expect(self, kind: str, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the gateway process sent nothing within {timeout:.0f} s") from None
        if not line:
            raise RuntimeError(f"the gateway process exited (code {self._proc.wait(5)})")
        message = json.loads(line)
        if message.get("kind") != kind:
            raise RuntimeError(f"the gateway process says: {message}")
        return message

    def ask(self, wearer: str, query: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"wearer": wearer, "query": query}) + "\n")
        self._proc.stdin.flush()
        message = self._expect("reply", REPLY_TIMEOUT_S + 5)
        return float(message["seconds"]), message["reply"]

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def gateway_worker(port: int, reply_topic: str) -> int:
    """The far end of `GatewayProcess`: one query per stdin line, one result per stdout line."""
    collector = ReplyCollector(port, reply_topic)
    try:
        print(json.dumps({"kind": "ready"}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            try:
                seconds, reply = collector.ask(request["wearer"], request["query"])
            except RuntimeError as exc:
                print(json.dumps({"kind": "failed", "error": str(exc)}), flush=True)
                return 1
            print(json.dumps({"kind": "reply", "seconds": seconds, "reply": reply}), flush=True)
    finally:
        collector.close()
    return 0


def _direct(daemon: Daemon, text: str, max_tokens: int) -> tuple[float, int]:
    """The generation the daemon's worker runs for this query, called on its backend."""
    m = daemon.config.model
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=m.temperature,
        top_k=m.top_k,
        top_p=m.top_p,
        repetition_penalty=m.repetition_penalty,
        reasoning_budget=m.reasoning_budget,
    )
    messages = [{"role": "system", "content": m.system_prompt}, {"role": "user", "content": text}]
    started = time.perf_counter()
    assert daemon.backend is not None
    result = daemon.backend.chat(messages, config, enable_thinking=m.enable_thinking)
    return time.perf_counter() - started, result.completion_tokens


def answer_store_put_ms(state_dir: Path, n: int = 30) -> dict[str, float | int | None]:
    """What writing one final reply to the answered-query store costs (it is on the reply's
    critical path: stored, durably, before it is published), on the daemon's state disk."""
    payload = b"x" * 900  # about an advice payload
    times = []
    store = AnswerStore(state_dir / "bench-store.sqlite3", 3600)
    try:
        for i in range(n):
            started = time.perf_counter()
            store.put("bench-store", f"s-{uuid.uuid4().hex[:8]}-{i}", "t", payload, None)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        store.close()
    return summary(times)


def bench_latency(
    daemon: Daemon,
    port: int,
    samples: int,
    warmup: int,
    max_tokens: int,
    in_process_gateway: bool = False,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    if daemon.config.model.temperature != 0.0:
        raise SystemExit(
            "bench_mqtt: the daemon must decode greedily (model.temperature 0) "
            "for both paths to generate the same tokens"
        )
    run = uuid.uuid4().hex[:6]
    reply_topic = f"edged/v1/{WEARER}/bench/{run}"
    collector: ReplyCollector | GatewayProcess = (
        ReplyCollector(port, reply_topic)
        if in_process_gateway
        else GatewayProcess(port, reply_topic)
    )
    mqtt_ms: list[float] = []
    direct_ms: list[float] = []
    internal_ms: list[float] = []
    paired_ms: list[float] = []
    tokens: list[int] = []
    mismatched = 0
    finish: dict[str, int] = {}
    progress.say(f"latency: {samples} queries per path after {warmup} warm-up", force=True)
    try:
        for i, text in enumerate(query_texts(warmup + samples)):
            progress.say(f"latency: query {i + 1}/{warmup + samples} ({warmup} warm-up)")
            # include_vitals off: the direct call below sends the bare question, and the
            # comparison needs the same prompt on both paths.
            query = {
                "id": f"b-{run}-{i}",
                "text": text,
                "max_tokens": max_tokens,
                "include_vitals": False,
            }

            def via_mqtt(query: dict[str, Any] = query) -> tuple[float, dict[str, Any]]:
                return collector.ask(WEARER, query)

            # Alternate which path goes first, so neither always runs on a warmer cache.
            if i % 2 == 0:
                m_s, reply = via_mqtt()
                d_s, d_tokens = _direct(daemon, text, max_tokens)
            else:
                d_s, d_tokens = _direct(daemon, text, max_tokens)
                m_s, reply = via_mqtt()
            if "code" in reply:
                raise RuntimeError(
                    f"query {query['id']} got error {reply['code']}: {reply['message']}"
                )
            if i < warmup:
                continue
            m_tokens = reply["usage"]["completion_tokens"]
            if m_tokens != d_tokens:
                mismatched += 1
            mqtt_ms.append(m_s * 1000)
            direct_ms.append(d_s * 1000)
            paired_ms.append((m_s - d_s) * 1000)
            internal_ms.append(float(reply["timing_ms"]["total"]))
            tokens.append(m_tokens)
            finish[reply["finish_reason"]] = finish.get(reply["finish_reason"], 0) + 1
    finally:
        collector.close()
    p50_mqtt, p50_direct = pct(mqtt_ms, 50), pct(direct_ms, 50)
    assert p50_mqtt is not None and p50_direct is not None
    overhead = p50_mqtt - p50_direct
    allowed = max(OVERHEAD_TARGET_MS, OVERHEAD_TARGET_FRACTION * p50_direct)
    return {
        "samples": samples,
        "warmup": warmup,
        "gateway": "in-process" if in_process_gateway else "own process",
        "max_tokens": max_tokens,
        "completion_tokens": summary([float(t) for t in tokens]),
        "token_count_mismatches": mismatched,
        "finish_reasons": finish,
        "direct_ms": summary(direct_ms),
        "mqtt_ms": summary(mqtt_ms),
        "daemon_timing_total_ms": summary(internal_ms),
        "paired_difference_ms": summary(paired_ms),
        "answer_store_put_ms": answer_store_put_ms(Path(daemon.config.delivery.state_dir)),
        "overhead_p50_ms": round(overhead, 3),
        "overhead_p50_pct": round(100 * overhead / p50_direct, 2),
        "allowed_ms": round(allowed, 3),
        "verdict": "PASS" if overhead <= allowed else "FAIL",
    }


# -- (c): vitals ingestion -------------------------------------------------------------------


def vitals_lines(n: int, now: float) -> list[bytes]:
    """n valid, varied v1 vitals summaries, one JSON object per line (~280 bytes each)."""
    lines = []
    for i in range(n):
        hr = 60 + (i * 7) % 50
        spo2 = 92 + i % 8
        body = {
            "ts": int(now),
            "window_s": 60,
            "heart_rate": {"mean": hr, "min": hr - 8, "max": hr + 12},
            "spo2": {"mean": spo2, "min": spo2 - 2},
            "resp_rate": 12 + i % 10,
            "temp_c": round(36.2 + (i % 15) / 10, 1),
            "systolic_bp": 100 + i % 40,
            "diastolic_bp": 60 + i % 25,
            "hrv_rmssd_ms": 20 + i % 50,
            "steps": i % 90,
            "activity": ("rest", "walk", "sleep")[i % 3],
            "on_oxygen": False,
            "spo2_scale": 1,
            "consciousness": "alert",
            "events": [],
        }
        lines.append(json.dumps(body, separators=(",", ":")).encode() + b"\n")
    return lines


def _thread_cpu_s(native_id: int | None) -> float | None:
    if native_id is None:
        return None
    for thread in psutil.Process().threads():
        if thread.id == native_id:
            return thread.user_time + thread.system_time
    return None


def bench_vitals(
    daemon: Daemon,
    port: int,
    qos: int,
    total: int,
    publishers: int,
    workdir: Path,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    mosquitto_pub = shutil.which("mosquitto_pub")
    if mosquitto_pub is None:
        raise SystemExit("bench_mqtt: mosquitto_pub not found; apt-get install mosquitto-clients")
    lines = vitals_lines(total, time.time())
    files = []
    for k in range(publishers):
        path = workdir / f"vitals-q{qos}-{k}.jsonl"
        path.write_bytes(b"".join(lines[k::publishers]))
        files.append(path)
    base = daemon.metrics().counters
    base_vitals, base_errors = base.vitals, base.errors
    # The thread that parses and scores every message.
    network_tid = next(t.native_id for t in threading.enumerate() if t.name == "mqtt-network")
    cpu_thread_0 = _thread_cpu_s(network_tid)
    cpu_proc_0 = sum(psutil.Process().cpu_times()[:2])

    samples: list[tuple[float, int]] = []
    progress.say(f"vitals QoS {qos}: {total:,} summaries from {publishers} publishers", True)
    started = time.perf_counter()
    procs = []
    for k, path in enumerate(files):
        with path.open("rb") as stdin:
            procs.append(
                subprocess.Popen(
                    [
                        mosquitto_pub,
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "-q",
                        str(qos),
                        "-i",
                        f"bench-pub-{qos}-{k}-{os.getpid()}",
                        "-t",
                        f"edged/v1/vload-{k:02d}/vitals",
                        "-l",
                    ],
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
    publishers_done: float | None = None
    last_change = time.perf_counter()
    last_count = 0
    deadline = started + INGEST_TIMEOUT_S
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        count = daemon.metrics().counters.vitals - base_vitals
        progress.say(f"vitals QoS {qos}: {count:,}/{total:,} counted ({now - started:.0f} s)")
        if count != last_count:
            samples.append((now, count))
            last_count, last_change = count, now
        if publishers_done is None and all(p.poll() is not None for p in procs):
            publishers_done = now
        if count >= total or (
            publishers_done is not None and now - last_change > INGEST_IDLE_TIMEOUT_S
        ):
            break
        time.sleep(SAMPLE_EVERY_S)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    failures = [
        p.stderr.read().decode(errors="replace").strip()
        for p in procs
        if p.returncode != 0 and p.stderr is not None
    ]
    for proc in procs:
        if proc.stderr is not None:
            proc.stderr.close()
    cpu_thread_1 = _thread_cpu_s(network_tid)
    cpu_proc_1 = sum(psutil.Process().cpu_times()[:2])

    counters = daemon.metrics().counters
    counted = counters.vitals - base_vitals
    first_t, last_t = (samples[0][0], samples[-1][0]) if samples else (started, started)
    span = last_t - first_t
    # The first sample already includes what arrived before it: rate over the rest.
    first_count = samples[0][1] if samples else 0
    rate = (counted - first_count) / span if span > 0 else None
    pub_span = (publishers_done or time.perf_counter()) - started
    thread_cpu = (
        cpu_thread_1 - cpu_thread_0
        if cpu_thread_0 is not None and cpu_thread_1 is not None
        else None
    )
    lag = last_t - (publishers_done or last_t)
    return {
        "qos": qos,
        "published": total,
        "publishers": publishers,
        "counted": counted,
        "lost": total - counted,
        "errors": counters.errors - base_errors,
        "publisher_failures": failures,
        "publishers_s": round(pub_span, 3),
        "offered_per_s": round(total / pub_span, 1) if pub_span > 0 else None,
        "ingest_s": round(span, 3),
        "daemon_per_s": round(rate, 1) if rate is not None else None,
        "daemon_lag_after_publishers_s": round(lag, 3),
        "network_thread_cpu_s": round(thread_cpu, 3) if thread_cpu is not None else None,
        "per_cpu_s": round(counted / thread_cpu, 1) if thread_cpu else None,
        "process_cpu_s": round(cpu_proc_1 - cpu_proc_0, 3),
        "limited_by": "daemon" if lag > 0.1 * pub_span else "publishers",
        "verdict": (
            "PASS"
            if rate is not None and rate >= VITALS_TARGET_PER_S and counted == total
            else "FAIL"
        ),
    }


# -- report ----------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_tables(result: dict[str, Any]) -> str:
    env = result["environment"]
    out = [
        f"model {env['model']} ({env['quant']}, {env['engine_threads']} engine threads), "
        f"{env['cpus']} CPUs, mosquitto {env['mosquitto']}, python {env['python']}, "
        f"state dir {env['state_dir']}"
    ]
    lat = result.get("latency")
    if lat:
        out += [
            "",
            f"(a)/(b) query latency, sequential, n={lat['samples']} after {lat['warmup']} "
            f"warmup, max_tokens {lat['max_tokens']}, completion tokens p50 "
            f"{_f(lat['completion_tokens']['p50'], 0)}"
            f" ({lat['token_count_mismatches']} token-count mismatches)",
            f"  {'path':<38}{'p50 ms':>9}{'p90 ms':>9}{'max ms':>9}{'mean ms':>9}",
        ]
        for label, key in (
            ("(b) engine.chat() direct", "direct_ms"),
            ("(a) MQTT: publish -> final advice", "mqtt_ms"),
            ("    daemon's own timing_ms.total", "daemon_timing_total_ms"),
            ("    paired difference (a) - (b)", "paired_difference_ms"),
            ("    answer store put (fsync), alone", "answer_store_put_ms"),
        ):
            s = lat[key]
            out.append(
                f"  {label:<38}{_f(s['p50'], 2):>9}{_f(s['p90'], 2):>9}"
                f"{_f(s['max'], 2):>9}{_f(s['mean'], 2):>9}"
            )
        out.append(
            f"  MQTT overhead at p50: {lat['overhead_p50_ms']:.2f} ms "
            f"({lat['overhead_p50_pct']:.1f} %); target <= {lat['allowed_ms']:.2f} ms "
            f"(5 ms or 2 %, whichever is larger): {lat['verdict']}"
        )
    vit = result.get("vitals")
    if vit:
        out += [
            "",
            "(c) vitals ingestion (valid summaries, mosquitto_pub -l publishers)",
            f"  {'QoS':<4}{'published':>10}{'counted':>9}{'errors':>7}{'offered/s':>11}"
            f"{'daemon/s':>10}{'net CPU s':>10}{'per CPU-s':>11}{'limited by':>12}"
            f"{'verdict':>9}",
        ]
        for v in vit:
            out.append(
                f"  {v['qos']:<4}{v['published']:>10,}{v['counted']:>9,}"
                f"{v['errors']:>7}{_f(v['offered_per_s'], 0):>11}"
                f"{_f(v['daemon_per_s'], 0):>10}{_f(v['network_thread_cpu_s'], 2):>10}"
                f"{_f(v['per_cpu_s'], 0):>11}{v['limited_by']:>12}{v['verdict']:>9}"
            )
        out.append(f"  target: >= {VITALS_TARGET_PER_S:,.0f} summaries/s, none lost")
    return "\n".join(out)


def _mosquitto_version() -> str | None:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        # `mosquitto -h` prints "mosquitto version X" and exits non-zero.
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.splitlines()[0] if out else ""
    return first.split("version")[-1].strip() or None


def _paho_version() -> str:
    from importlib.metadata import version

    return version("paho-mqtt")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="edged model directory")
    p.add_argument("--threads", type=int, default=0, help="engine threads (0 = every core)")
    p.add_argument("--context", type=int, default=1024, help="KV cache size in tokens")
    p.add_argument("--samples", type=int, default=80, help="timed queries per path")
    p.add_argument("--warmup", type=int, default=5, help="untimed queries first")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every query")
    p.add_argument("--vitals", type=int, default=50_000, help="summaries per QoS level")
    p.add_argument("--publishers", type=int, default=2, help="mosquitto_pub processes")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="make the daemon's temporary state dir here: the answered-query store fsyncs "
        "every reply, so put it on the filesystem the node will use",
    )
    p.add_argument(
        "--in-process-gateway",
        action="store_true",
        help="run the (a) client in this process, sharing the GIL with the daemon",
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-vitals", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--progress-every",
        type=float,
        default=1.0,
        help="a progress line on stderr this often, in seconds (0: none)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--gateway-worker"] and len(argv) == 3:
        return gateway_worker(int(argv[1]), argv[2])
    args = p.parse_args(argv)
    if not (args.model / "edged-model.json").is_file():
        print(f"bench_mqtt: no edged model at {args.model}", file=sys.stderr)
        return 2
    # The daemon logs every query at info; a terminal full of it is not what is measured.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    result: dict[str, Any] = {}
    progress = Progress(args.progress_every)
    progress.say(f"starting mosquitto and the daemon on {args.model}", force=True)
    with (
        PrivateBroker() as broker,
        tempfile.TemporaryDirectory(prefix="edged-bench-", dir=args.state_dir) as tmp,
    ):
        config = parse_config(
            {
                "node_id": "bench-node",
                "mqtt": {"host": "127.0.0.1", "port": broker.port},
                "model": {
                    "path": str(args.model),
                    "threads": args.threads,
                    "context_length": args.context,
                },
                "limits": {"max_tokens_cap": max(512, args.max_tokens)},
                "delivery": {"state_dir": tmp},
            }
        )
        daemon = Daemon(config)
        daemon.start()
        try:
            if not daemon.wait_ready(10):
                print("bench_mqtt: the daemon did not connect to the broker", file=sys.stderr)
                return 1
            if daemon.backend is None:
                print("bench_mqtt: the model did not load", file=sys.stderr)
                return 1
            info = daemon.backend.info
            result["environment"] = {
                "state_dir": tmp,
                "model": info.name,
                "quant": info.quantization,
                "engine_threads": info.threads,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "mosquitto": _mosquitto_version(),
                "paho_mqtt": _paho_version(),
            }
            if not args.skip_latency:
                result["latency"] = bench_latency(
                    daemon,
                    broker.port,
                    args.samples,
                    args.warmup,
                    args.max_tokens,
                    in_process_gateway=args.in_process_gateway,
                    progress=progress,
                )
            if not args.skip_vitals:
                result["vitals"] = [
                    bench_vitals(
                        daemon, broker.port, qos, args.vitals, args.publishers, Path(tmp), progress
                    )
                    for qos in (0, 1)
                ]
        finally:
            daemon.stop()
    print(json.dumps(result, indent=2))
    print()
    print(format_tables(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    verdicts = [result.get("latency", {}).get("verdict", "PASS")]
    verdicts += [v["verdict"] for v in result.get("vitals", [])]
    return 0 if all(v == "PASS" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
