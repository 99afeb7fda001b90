#!/usr/bin/env python3
"""Fault-and-soak campaign (issue #16): load, a fault schedule, and an end check of every query
and every alert-worthy vitals summary.

    python tools/soak.py --quick [--json soak.json]       # about 3 minutes
    python tools/soak.py --long --json soak-long.json     # an hour
    python tools/soak.py --quick --duration 50            # shorter, as tests/test_soak.py

It starts a private mosquitto (persistence on) and `python -m edged run` on the bundled tiny
model in a child process (restarted at once after each kill, as systemd would), then for
`--duration` seconds drives gateway-style load from one MQTT 5 client on a persistent session:
vitals of N wearers (QoS 1, tools/gateway_sim.py's random walk), queries with a mix of stream,
urgent priority, deadline_s and cancel, alert-worthy summaries (SpO2 85) from alert wearers, and
a fuzz stream of hostile payloads from a second client. Meanwhile a fault schedule runs: daemon
SIGKILL mid-generation, SIGTERM during a burst, broker restart, broker SIGKILL, broker outage,
SIGHUP with a valid and an invalid config during a long generation, the answered-query store
corrupted or truncated while the daemon is stopped, and (as root, on a tmpfs state dir) the
state dir full (ENOSPC; `state_dir_full_long` with more unstored replies than the daemon's MQTT
Receive Maximum) and read-only, and the daemon's wall clock set 2 h forward or back
(`wall_clock_jump`, tools/clockshift.c in its LD_PRELOAD) with a deadline in flight. Each
fault is logged with its time and whether the daemon came back to ready. `--faults a,b`
cycles through a chosen list instead. The last `quiet_tail_s` of a run (20 min of the long
profile) restarts no daemon, so one process lives long enough for an RSS slope; in the long
profile it opens with a broker outage, so that process meets its second outage in the slope.

What is checked at the end:
* every *accepted* query (the broker PUBACKed its publish, so it holds it for the daemon's
  persistent session) has exactly one final reply (advice, or `cancelled`/`deadline_exceeded`
  where it asked for that); `busy` is not final: the query is re-sent with the same id after
  `retry_after_ms`, as the contract asks. A query answered twice must get byte-identical copies.
* every accepted alert-worthy summary produced an alert with its `alert_id`
  (edged.mqtt.payloads.alert_id). With `clinical.alert_cooldown_s: 0`, `should_alert` is true for
  every alerting triage, and alert wearers only ever send SpO2 85 (red flag `spo2_low`), so
  every one of their summaries must alert.
* every final reply received since the store was last damaged on purpose is in the answered
  store (read from the SQLite file), byte-identical: stored before it was sent, so no query
  was acknowledged without a stored reply (`replies_sent_unstored`).
* RSS and open fds of the daemon, sampled every few seconds; `rss_slope_kb_per_hour` is the
  least-squares slope over the longest-lived daemon process after its warm-up (restarts split
  the series): past `warmup_s` and past the first of each kind of fault it met (`settled_from`),
  so a one-time high-water is left out and a growth that repeats with every fault is not;
  `rss_slope_ci95_kb_per_hour` its 95 % interval, widened for samples that are not
  independent, and `rss_slope_within_noise` whether that interval holds 0.
* fsyncs per answer: `strace -f -c -e trace=fsync,fdatasync -p PID` over sampled windows,
  divided by the first final replies received in the same windows.
* restart-to-ready: process start (or broker back) to the log line "topic filters: ready".

Exit status 0 only when no query or alert was lost, no duplicate differed, the daemon never
died on its own and every fault recovered. Broker SIGKILL: mosquitto 2.0 saves its persistence
when more than `autosave_interval` whole seconds have passed (every 2 s with 1), so a message it
PUBACKed in the last 2 s may be gone from the broker. The daemon keeps the queries it received
(edged.service.inbox); the load is held for 2.5 s before the kill so that nothing it never
received is lost with the broker's memory and counted against edged.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from gateway_sim import QUESTIONS, new_wearer, step_vitals, vitals_summary
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.models import TINY_QWEN3_INT4
from edged.mqtt.payloads import alert_id
from edged.service.broker import PrivateBroker

REPO = Path(__file__).resolve().parent.parent
P = "edged/v1"
READY = "topic filters: ready"
RELOADED = "reloaded:"
RELOAD_FAILED = "reload failed"
CLOCK_SET = "the wall clock was set"
MARKS = (READY, RELOADED, RELOAD_FAILED, CLOCK_SET)
RECOVER_TIMEOUT_S = 60.0
FINAL_ERRORS_OK = {"cancelled": "cancel", "deadline_exceeded": "deadline"}
"""Error replies a query deserves when it asked for them (a cancel sent, a deadline given)."""
STORE_FILE = "answered.sqlite3"


def say(line: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# -- profiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    duration_s: float
    fault_every_s: float
    """Pause between the end of one fault and the start of the next."""
    outage_s: float
    """How long the broker stays down in the `broker_outage` fault."""
    wearers: int = 6
    vitals_rate: float = 2.0
    """Vitals summaries per second over all load wearers."""
    query_rate: float = 0.6
    """Queries per second over all load wearers (a generation takes ~0.5-1 s)."""
    alert_wearers: int = 2
    alert_rate: float = 0.5
    """Alert-worthy summaries per second over all alert wearers."""
    fuzz_rate: float = 20.0
    max_tokens: int = 16
    pause_ms: float = 40.0
    sample_every_s: float = 2.0
    warmup_s: float = 70.0
    """Past the 60 s vitals window, which grows the daemon's state until it is full."""
    fsync_every_s: float = 600.0
    fsync_window_s: float = 10.0
    drain_s: float = 60.0
    cycle: tuple[str, ...] = ()
    debug_log: bool = False
    """The daemon logs at DEBUG: every message received and acked, by packet id."""
    quiet_tail_s: float = 0.0
    """The run's last this-many seconds cycle only QUIET_CYCLE (no daemon restart), so one
    daemon process lives long enough for an RSS slope; at most a third of the run."""


QUICK_CYCLE = (
    "daemon_sigkill",
    "broker_restart",
    "sighup_valid",
    "daemon_sigterm",
    "daemon_sigkill",
    "broker_sigkill",
    "sighup_invalid",
    "store_corrupt",
    "broker_outage",
    "state_dir_full",
    "daemon_sigkill",
    "state_dir_readonly",
    "store_truncate",
    "wall_clock_jump",
)
# The long profile needs >= 100 daemon SIGKILLs and >= 20 broker restarts in an hour: half the
# steps are kills, and a fault every few seconds (compressed time: the daemon needs no quiet
# period between faults, only its restart).
LONG_CYCLE = (
    "daemon_sigkill",
    "broker_restart",
    "daemon_sigkill",
    "sighup_valid",
    "daemon_sigkill",
    "daemon_sigterm",
    "daemon_sigkill",
    "sighup_invalid",
    "daemon_sigkill",
    "broker_sigkill",
    "daemon_sigkill",
    "broker_restart",
    "daemon_sigkill",
    "state_dir_full",
    "daemon_sigkill",
    "store_corrupt",
    "daemon_sigkill",
    "state_dir_readonly",
    "daemon_sigkill",
    "store_truncate",
    "daemon_sigkill",
    "wall_clock_jump",
)
# (the long profile's broker outage comes every OUTAGE_EVERY_S instead of in the cycle)
QUIET_CYCLE = (
    "broker_restart",
    "sighup_valid",
    "broker_sigkill",
    "sighup_invalid",
    "wall_clock_jump",
)
PROFILES = {
    "quick": Profile(
        "quick", 180.0, 4.0, 8.0, cycle=QUICK_CYCLE, fsync_every_s=120.0, quiet_tail_s=60.0
    ),
    "long": Profile(
        "long",
        3600.0,
        4.0,
        60.0,
        fuzz_rate=32.0,
        sample_every_s=5.0,
        cycle=LONG_CYCLE,
        drain_s=120.0,
        quiet_tail_s=1200.0,
    ),
}
PROGRESS_EVERY_S = 30.0
FIRST_FSYNC_S = 10.0
"""The first fsync window, this far into the run (then every `fsync_every_s`)."""
OUTAGE_EVERY_S = 900.0
"""The long profile's 60 s broker outage, this often (it would otherwise eat the hour), and
once as the quiet tail begins, so that the tail's process meets one in its warm-up and the
next inside its RSS slope."""
SETTLE_S = 30.0
"""A reconnect backlog (60 s of load) is worked off within this after the broker is back."""
BROKER_SAVE_S = 2.5
"""Past mosquitto's save period with `autosave_interval 1`: 'last_backup + 1 < now' in whole
seconds (src/loop.c), so every 2 s."""


# -- the ledger: what was sent and what came back -----------------------------------------------


def broker_has(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker PUBACKed the message. Not `is_published()`: it raises for a message
    first published while disconnected, even after paho re-sent it and got the PUBACK."""
    with info._condition:
        return bool(info._published)


@dataclass
class SentQuery:
    wearer: str
    qid: str
    payload: bytes
    deserves: set[str]
    """Besides advice, the final errors this query may get: `cancel`, `deadline`."""
    infos: list[mqtt.MQTTMessageInfo] = field(default_factory=list)
    finals: list[bytes] = field(default_factory=list)
    busy: int = 0
    first_final_at: float | None = None
    chunk: threading.Event = field(default_factory=threading.Event)

    @property
    def accepted(self) -> bool:
        return any(broker_has(i) for i in self.infos)


@dataclass
class SentSummary:
    wearer: str
    info: mqtt.MQTTMessageInfo


class Ledger:
    """Everything sent and received; the MQTT threads write, the end check reads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queries: dict[tuple[str, str], SentQuery] = {}
        self.summaries: dict[str, SentSummary] = {}
        self.alerts: Counter[str] = Counter()
        """Every alert_id received, with how many times."""
        self.stream_chunks = 0
        self.fuzz_sent: Counter[str] = Counter()
        self.fuzz_replies: Counter[str] = Counter()
        self.node_errors: Counter[str] = Counter()
        self.fuzz_advice = 0
        self.unexpected: list[str] = []
        self.retries: list[tuple[float, str, str]] = []
        """(due, wearer, id) of queries answered `busy`, re-sent when due (a heap)."""

    def on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        wearer, tail = (parts[2], parts[3:]) if len(parts) > 3 else ("", [])
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return
        with self.lock:
            if wearer == "_node":
                # invalid_wearer (bad topics), and `internal` for a failed reload
                self.node_errors[str(body.get("code"))] += 1
            elif wearer.startswith("fz-"):
                self._fuzz_reply(body, tail)
            elif tail == ["alert"]:
                self._alert(body)
            elif tail[:1] == ["reply"]:
                self._reply(wearer, body, payload, stream=tail[-1] == "stream")

    def _fuzz_reply(self, body: dict[str, Any], tail: list[str]) -> None:
        if "code" in body:
            self.fuzz_replies[str(body["code"])] += 1
        elif "text" in body and tail == ["advice"]:
            self.fuzz_advice += 1  # a hostile payload was taken for a query: never allowed

    def _alert(self, body: dict[str, Any]) -> None:
        self.alerts[str(body.get("alert_id"))] += 1

    def _reply(self, wearer: str, body: dict[str, Any], payload: bytes, stream: bool) -> None:
        q = self.queries.get((wearer, str(body.get("id"))))
        if q is None:
            self.unexpected.append(f"reply for an unknown query {wearer}/{body.get('id')}")
            return
        if stream:
            self.stream_chunks += 1
            q.chunk.set()
            return
        code = body.get("code")
        if code == "busy":
            q.busy += 1
            due = time.monotonic() + (body.get("retry_after_ms") or 500) / 1000
            heapq.heappush(self.retries, (due, wearer, q.qid))
            return
        if code is not None and FINAL_ERRORS_OK.get(str(code)) not in q.deserves:
            self.unexpected.append(f"{wearer}/{q.qid}: error {code}: {body.get('message')}")
        if q.first_final_at is None:
            q.first_final_at = time.monotonic()
        q.finals.append(payload)

    def finals_between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(
                1
                for q in self.queries.values()
                if q.first_final_at is not None and start <= q.first_final_at <= end
            )

    def outstanding(self) -> int:
        """Accepted queries without a final reply, and accepted summaries without an alert."""
        with self.lock:
            queries = sum(1 for q in self.queries.values() if q.accepted and not q.finals)
            alerts = sum(
                1 for a, s in self.summaries.items() if broker_has(s.info) and not self.alerts[a]
            )
        return queries + alerts


# -- MQTT clients ------------------------------------------------------------------------------


class Client:
    """A paho MQTT 5 client that reconnects by itself; persistent: its session (subscriptions,
    queued QoS 1 messages) outlives a disconnect, at the broker and in paho's outbox."""

    def __init__(
        self, port: int, name: str, subs: list[str], on_message: Callable[[str, bytes], None]
    ) -> None:
        self._subs = subs
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5
        )
        self.client.max_queued_messages_set(0)
        # paho annotates ints but sleeps for any number: a gateway back within 0.1 s.
        self.client.reconnect_delay_set(0.1, 1.0)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: on_message(m.topic, bytes(m.payload))
        self.connected = threading.Event()
        self.client.on_disconnect = lambda *a: self.connected.clear()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if subs else 0
        self.client.connect("127.0.0.1", port, clean_start=not subs, properties=props)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError(f"{name} could not connect to the broker on port {port}")

    def _on_connect(self, c: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        if self._subs:
            c.subscribe([(t, 1) for t in self._subs])
        self.connected.set()

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, response_topic: str | None = None
    ) -> mqtt.MQTTMessageInfo:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
            props.CorrelationData = payload[:16]
        return self.client.publish(topic, payload, qos=qos, properties=props)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- hostile payloads --------------------------------------------------------------------------


def _deep(depth: int) -> bytes:
    return b'{"id": ' + b"[" * depth + b"]" * depth + b"}"


# Each builds (topic level after the wearer, payload); none is a valid message, so each must get
# an error reply or be ignored (API.md), and none may take the worker.
FUZZ: dict[str, Callable[[random.Random, str], tuple[str, bytes]]] = {
    "random_bytes": lambda r, i: (
        r.choice(("query", "vitals", "cancel")),
        r.randbytes(r.randint(1, 300)),
    ),
    "deep_json": lambda r, i: (r.choice(("query", "vitals")), _deep(r.choice((100, 5000, 100000)))),
    "huge_number": lambda r, i: (
        "query",
        b'{"id": "%s", "text": "hi", "max_tokens": 1%s}' % (i.encode(), b"0" * r.randint(20, 5000)),
    ),
    "inf_vitals": lambda r, i: (
        "vitals",
        b'{"ts": 1e999, "spo2": {"min": -1e308}, "heart_rate": NaN}',
    ),
    "wrong_types": lambda r, i: (
        r.choice(("query", "vitals", "cancel")),
        r.choice(
            (
                b'{"id": [], "text": 5}',
                b"[1, 2]",
                b"null",
                b'"q"',
                b'{"ts": "x", "spo2": "low"}',
                b'{"id": 7}',
                b'{"id": "%s", "text": "hi", "stream": "yes"}' % i.encode(),
            )
        ),
    ),
    "too_large": lambda r, i: ("query", b'{"id": "%s", "text": "%s"}' % (i.encode(), b"a" * 20000)),
    "bad_utf8": lambda r, i: ("query", b'{"id": "\xff\xfe", "text": "\xc3\x28"}'),
    "bad_fhir": lambda r, i: (
        "vitals",
        b'{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation", '
        b'"code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}, '
        b'"valueQuantity": {"value": "NaN", "unit": "/min"}}}]}',
    ),
}
BAD_TOPICS = (
    "edged/v1/bad wearer!/query",
    "edged/v1/{w}/nonsense",
    "edged/v1//query",
    "edged/v1/" + "x" * 100 + "/vitals",
    "edged/v2/{w}/query",
)


def hostile(rng: random.Random, n: int) -> tuple[str, str, bytes]:
    """(kind, topic, payload) of the n-th hostile message."""
    wearer = f"fz-{n % 7}"
    if n % 11 == 0:
        topic = rng.choice(BAD_TOPICS).replace("{w}", wearer)
        return "bad_topic", topic, b'{"id": "fz%d", "text": "hello"}' % n
    kind = rng.choice(sorted(FUZZ))
    level, payload = FUZZ[kind](rng, f"fz{n}")
    return kind, f"{P}/{wearer}/{level}", payload


# -- the daemon, supervised --------------------------------------------------------------------


class LogWatch:
    """Counts marker lines in the daemon's log, reading only what was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._carry = ""
        self.counts: Counter[str] = Counter()

    def poll(self) -> Counter[str]:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset += len(chunk)
            text = self._carry + chunk.decode(errors="replace")
            cut = text.rfind("\n") + 1
            for mark in MARKS:
                self.counts[mark] += text[:cut].count(mark)
            self._carry = text[cut:]
        return self.counts

    def wait(
        self, mark: str, above: int, timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll()[mark] > above:
                return True
            if not alive():
                return False
            time.sleep(0.05)
        return False


class Daemon:
    """`python -m edged -v run` in a child process; restarted at once after a kill."""

    def __init__(self, workdir: Path, env: dict[str, str], debug: bool = False) -> None:
        self.verbosity = "-vv" if debug else "-v"
        self.config_path = workdir / "edged.yaml"
        self.log_path = workdir / "daemon.log"
        self.watch = LogWatch(self.log_path)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: list[float] = []
        self.unexpected_exits: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> bool:
        """Start it and wait for ready; records the restart-to-ready time."""
        before = self.watch.poll()[READY]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edged",
                    self.verbosity,
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                cwd=str(REPO),
            )
        if not self.watch.wait(READY, before, RECOVER_TIMEOUT_S, lambda: self.pid is not None):
            return False
        self.ready_s.append(time.monotonic() - started)
        return True

    def signal(self, sig: signal.Signals, timeout: float = 30.0) -> int | None:
        """Send `sig` and wait for the exit; SIGKILL after `timeout`. The exit code."""
        if self.proc is None:
            return None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def check_alive(self) -> None:
        """A daemon that died on its own is a defect: logged, then restarted as systemd would."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            tail = self.log_path.read_text(errors="replace")[-1500:]
            self.unexpected_exits.append(f"exit {code} at {time.strftime('%H:%M:%S')}: {tail}")
            say(f"DEFECT: the daemon exited on its own (code {code}); restarting it")
            self.start()

    def stop(self) -> None:
        if self.pid is not None:
            self.signal(signal.SIGTERM)


class NotifySocket:
    """Plays systemd's side of sd_notify: records when WATCHDOG=1 pings arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.pings: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            if b"WATCHDOG=1" in data:
                self.pings.append(time.monotonic())

    def max_gap(self, start: float, end: float) -> float:
        times = [start, *(t for t in self.pings if start <= t <= end), end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


# -- the load ----------------------------------------------------------------------------------


class Load:
    """Publishes vitals, queries, cancels, alert-worthy summaries and hostile payloads at the
    profile's rates, from its own thread; `hold` pauses it (before a broker SIGKILL)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.rng = random.Random(16)
        self.wearers = [new_wearer(f"sk-{i:02d}", False, self.rng) for i in range(rig.p.wearers)]
        self.hold = threading.Event()
        self.quiet = threading.Event()
        """The run is over: no new traffic, but `busy` answers are still retried (drain)."""
        self.stop = threading.Event()
        self.n = 0
        self.fuzz_n = 0
        self.cancels: list[tuple[float, str, str]] = []
        self.lock = threading.RLock()
        """Held by each publishing step: the fault schedule sends probes from another thread."""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        p, tick = self.rig.p, 0.05
        due = dict.fromkeys(("vitals", "query", "alert", "fuzz"), time.monotonic())
        every = {
            "vitals": 1 / p.vitals_rate,
            "query": 1 / p.query_rate,
            "alert": 1 / p.alert_rate,
            "fuzz": 1 / p.fuzz_rate,
        }
        while not self.stop.wait(tick):
            if self.hold.is_set():
                continue
            now = time.monotonic()
            with self.lock:
                if not self.quiet.is_set():
                    for what, at in due.items():
                        while at <= now:
                            getattr(self, what)()
                            at += every[what]
                        due[what] = at
                self._due_cancels_and_retries(now)

    def vitals(self) -> None:
        state = self.rng.choice(self.wearers)
        step_vitals(state, self.rng)
        body = json.dumps(vitals_summary(state, self.rng, time.time())).encode()
        self.rig.gateway.publish(f"{P}/{state.wearer}/vitals", body)

    def alert(self) -> str:
        """Publishes an alert-worthy summary; its alert_id."""
        with self.lock:
            return self._alert()

    def _alert(self) -> str:
        wearer = f"al-{self.rng.randrange(self.rig.p.alert_wearers):02d}"
        self.n += 1
        # SpO2 85 on air is the red flag spo2_low (and NEWS2 3 for it) on its own, whatever the
        # window holds; `seq` makes each summary's bytes, hence its alert_id, unique.
        body = json.dumps(
            {"ts": time.time(), "spo2": {"mean": 86, "min": 85}, "heart_rate": 90, "seq": self.n}
        ).encode()
        info = self.rig.gateway.publish(f"{P}/{wearer}/vitals", body)
        aid = alert_id(wearer, body)
        with self.rig.ledger.lock:
            self.rig.ledger.summaries[aid] = SentSummary(wearer, info)
        return aid

    def query(
        self,
        max_tokens: int | None = None,
        urgent: bool = False,
        wearer: str | None = None,
        deadline_s: float | None = None,
    ) -> SentQuery:
        """A query from a load wearer (or `wearer`), random in its kind unless told."""
        with self.lock:
            return self._query(max_tokens, urgent, wearer, deadline_s)

    def _query(
        self, max_tokens: int | None, urgent: bool, wearer: str | None, deadline_s: float | None
    ) -> SentQuery:
        self.n += 1
        wearer = wearer or self.rng.choice(self.wearers).wearer
        body: dict[str, Any] = {
            "id": f"q{self.n}",
            "text": self.rng.choice(QUESTIONS),
            "max_tokens": max_tokens or self.rig.p.max_tokens,
            "stream": max_tokens is not None or self.rng.random() < 0.3,
            "priority": "urgent" if urgent or self.rng.random() < 0.2 else "normal",
        }
        deserves = set()
        if deadline_s is not None:
            body["deadline_s"] = deadline_s
            deserves.add("deadline")
        elif max_tokens is None and self.rng.random() < 0.25:
            body["deadline_s"] = round(self.rng.uniform(0.5, 6.0), 2)
            deserves.add("deadline")
        if max_tokens is None and deadline_s is None and self.rng.random() < 0.1:
            deserves.add("cancel")
            due = time.monotonic() + self.rng.uniform(0.1, 1.5)
            heapq.heappush(self.cancels, (due, wearer, body["id"]))
        q = SentQuery(wearer, body["id"], json.dumps(body).encode(), deserves)
        with self.rig.ledger.lock:
            self.rig.ledger.queries[(wearer, q.qid)] = q  # before sending: replies are fast
        self._send(q)
        return q

    def _send(self, q: SentQuery) -> None:
        topic = f"{P}/{q.wearer}/query"
        q.infos.append(self.rig.gateway.publish(topic, q.payload, 1, f"{P}/{q.wearer}/reply/soak"))

    def _due_cancels_and_retries(self, now: float) -> None:
        while self.cancels and self.cancels[0][0] <= now:
            _, wearer, qid = heapq.heappop(self.cancels)
            self.rig.gateway.publish(f"{P}/{wearer}/cancel", json.dumps({"id": qid}).encode())
        led = self.rig.ledger
        with led.lock:
            due = []
            while led.retries and led.retries[0][0] <= now:
                _, wearer, qid = heapq.heappop(led.retries)
                due.append(led.queries[(wearer, qid)])
        for q in due:
            self._send(q)

    def fuzz(self) -> None:
        self.fuzz_n += 1
        kind, topic, payload = hostile(self.rng, self.fuzz_n)
        self.rig.ledger.fuzz_sent[kind] += 1
        self.rig.fuzzer.publish(topic, payload, qos=1 if self.fuzz_n % 10 == 0 else 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker has PUBACKed everything the gateway published."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.rig.ledger.lock:
                infos = [i for q in self.rig.ledger.queries.values() for i in q.infos[-1:]]
                infos += [s.info for s in self.rig.ledger.summaries.values()]
            if all(broker_has(i) for i in infos[-500:]):
                return True
            time.sleep(0.1)
        return False


# -- the rig and its faults --------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    at: str
    """Wall-clock time (UTC, ISO 8601) the fault started."""
    at_s: float
    """Seconds into the run."""
    ok: bool
    note: str
    ready_s: float | None = None
    end_s: float | None = None
    """Seconds into the run the fault was over (broker back, daemon ready again)."""


@dataclass
class Rig:
    p: Profile
    workdir: Path
    broker: PrivateBroker
    daemon: Daemon
    notify: NotifySocket
    config: dict[str, Any]
    state_dir: Path
    tmpfs: bool
    clock_file: Path | None = None
    """The daemon's wall-clock offset (tools/clockshift.c); None: wall_clock_jump is skipped."""
    store_reset_at: float = 0.0
    """When a store_corrupt/store_truncate fault last emptied the answered store (monotonic):
    replies first received after it must all be in the store at the end."""
    ledger: Ledger = field(default_factory=Ledger)
    faults: list[FaultRecord] = field(default_factory=list)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    """(monotonic time, pid, VmRSS kB, open fds)."""
    fsync_windows: list[tuple[int, int]] = field(default_factory=list)
    """(fsync + fdatasync calls, first final replies) per strace window."""
    started: float = field(default_factory=time.monotonic)
    next_progress: float = 0.0
    gateway: Client = field(init=False)
    fuzzer: Client = field(init=False)
    load: Load = field(init=False)

    def write_config(self, **override: Any) -> None:
        config = json.loads(json.dumps(self.config))
        for section, values in override.items():
            config.setdefault(section, {}).update(values)
        self.daemon.config_path.write_text(yaml.safe_dump(config))

    def reconnected(self, before: int) -> tuple[bool, float | None]:
        """Whether the daemon subscribed again (a new ready line) after a broker fault."""
        t0 = time.monotonic()
        ok = self.daemon.watch.wait(READY, before, RECOVER_TIMEOUT_S)
        return ok, (time.monotonic() - t0) if ok else None


Outcome = tuple[bool, str, float | None]
"""(recovered, note, seconds to ready)."""


def _restart(rig: Rig, note: str) -> Outcome:
    t0 = time.monotonic()
    ok = rig.daemon.start()
    return ok, note, time.monotonic() - t0 if ok else None


def fault_daemon_sigkill(rig: Rig) -> Outcome:
    probe = rig.load.query(max_tokens=rig.p.max_tokens * 2, urgent=True)
    mid = probe.chunk.wait(15.0)
    rig.daemon.signal(signal.SIGKILL)
    return _restart(rig, "mid-generation" if mid else "no stream chunk within 15 s: killed anyway")


def fault_daemon_sigterm(rig: Rig) -> Outcome:
    for _ in range(6):
        rig.load.query()
    time.sleep(0.3)
    code = rig.daemon.signal(signal.SIGTERM)
    ok, note, ready = _restart(rig, f"during a burst of 6; exit code {code}")
    return ok and code == 0, note, ready


def fault_broker_restart(rig: Rig) -> Outcome:
    before = rig.daemon.watch.poll()[READY]
    rig.broker.restart()
    ok, ready = rig.reconnected(before)
    return ok, "SIGTERM + start, persistence kept", ready


def fault_broker_sigkill(rig: Rig) -> Outcome:
    rig.load.hold.set()
    try:
        flushed = rig.load.flush()
        time.sleep(BROKER_SAVE_S)  # nothing the broker PUBACKed is only in its memory
        before = rig.daemon.watch.poll()[READY]
        proc = rig.broker.process
        if proc is not None:
            proc.kill()
            proc.wait(10)
        rig.broker.stop()
        rig.broker.start()
    finally:
        rig.load.hold.clear()
    ok, ready = rig.reconnected(before)
    note = f"load held {BROKER_SAVE_S} s first" + ("" if flushed else "; flush timed out")
    return ok, note, ready


def fault_broker_outage(rig: Rig) -> Outcome:
    before = rig.daemon.watch.poll()[READY]
    rig.broker.stop()
    time.sleep(rig.p.outage_s)
    rig.broker.start()
    ok, ready = rig.reconnected(before)
    return ok, f"broker down {rig.p.outage_s:.0f} s, load kept publishing", ready


def _sighup(rig: Rig, mark: str, **override: Any) -> Outcome:
    probe = rig.load.query(max_tokens=rig.p.max_tokens * 3, urgent=True)
    probe.chunk.wait(15.0)
    before = rig.daemon.watch.poll()[mark]
    rig.write_config(**override)
    t0 = time.monotonic()
    if rig.daemon.proc is not None:
        rig.daemon.proc.send_signal(signal.SIGHUP)
    seen = rig.daemon.watch.wait(mark, before, 20.0)
    rig.write_config()
    done = _wait_final(rig, probe, 30.0)
    gap = rig.notify.max_gap(t0, time.monotonic())
    alive = rig.daemon.pid is not None
    note = f"{mark!r} logged: {seen}; long query answered: {done}; watchdog gap {gap:.1f} s"
    return seen and done and alive and gap < 4.0, note, None


def _wait_final(rig: Rig, q: SentQuery, timeout: float) -> bool:
    return _wait_finals(q, 1, timeout)


def _wait_finals(q: SentQuery, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(q.finals) < count:
        time.sleep(0.05)
    return len(q.finals) >= count


def fault_sighup_valid(rig: Rig) -> Outcome:
    # A live clinical key: the window length, 60 <-> 61 s.
    window = 61.0 if sum(f.kind == "sighup_valid" for f in rig.faults) % 2 == 0 else 60.0
    return _sighup(rig, RELOADED, clinical={"window_s": window})


def fault_sighup_invalid(rig: Rig) -> Outcome:
    return _sighup(rig, RELOAD_FAILED, clinical={"window_s": 5})  # below its 60 s minimum


def _store_damage(rig: Rig, damage: Callable[[Path], None], what: str) -> Outcome:
    rig.daemon.signal(signal.SIGTERM)
    store = rig.state_dir / STORE_FILE
    if store.exists():
        damage(store)
    ok, note, ready = _restart(rig, f"store {what} while stopped")
    rig.store_reset_at = time.monotonic()
    if ok:
        return ok, note, ready
    # Not back by itself: what an operator would do, so the run can go on; the fault failed.
    for path in rig.state_dir.glob(STORE_FILE + "*"):
        path.unlink()
    rig.daemon.signal(signal.SIGKILL)
    rig.daemon.start()
    return False, note + ": NOT ready until the store was deleted", None


def fault_store_corrupt(rig: Rig) -> Outcome:
    def corrupt(path: Path) -> None:
        with path.open("r+b") as f:
            f.write(os.urandom(4096))

    return _store_damage(rig, corrupt, "header overwritten with random bytes")


def fault_store_truncate(rig: Rig) -> Outcome:
    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 2)

    return _store_damage(rig, truncate, "truncated to half")


def _disk_full(rig: Rig, queries: int) -> Outcome:
    """Fill the state dir's tmpfs while `queries` queries are answered, free it, then check
    that the daemon serves a fresh query and a fresh alert by itself."""
    if not rig.tmpfs:
        return True, "skipped: needs root for a tmpfs state dir", None
    filler = rig.state_dir / "filler"
    # suppress() outermost: closing the file flushes into the full disk and raises too, and
    # that must not skip freeing it (a run once stayed full to the end).
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\0" * 65536)
    try:
        sent = [rig.load.query() for _ in range(queries)]
        published = _wait_all(rig, sent, 5.0 + queries * 1.5)
        alive = rig.daemon.pid is not None
    finally:
        filler.unlink(missing_ok=True)
    after_q, after_a = rig.load.query(urgent=True), rig.load.alert()
    served = _wait_final(rig, after_q, 20.0)
    alerted = _wait_alert(rig, after_a, 20.0)
    note = (
        f"ENOSPC while {queries} queries were answered ({published} replies seen); daemon up: "
        f"{alive}; after freeing: a new query answered {served}, a new alert raised {alerted}"
    )
    return alive and served and alerted, note, None


def _wait_all(rig: Rig, queries: list[SentQuery], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(q.finals for q in queries):
        time.sleep(0.1)
    return sum(1 for q in queries if q.finals)


def _wait_alert(rig: Rig, aid: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rig.ledger.alerts[aid]:
            return True
        time.sleep(0.05)
    return False


def fault_state_dir_full(rig: Rig) -> Outcome:
    return _disk_full(rig, 4)


def fault_state_dir_full_long(rig: Rig) -> Outcome:
    # More unstored (so unacknowledged) replies than the daemon's MQTT Receive Maximum
    # (limits.queue_size + 1): does the broker still deliver anything to it afterwards?
    return _disk_full(rig, rig.config["limits"]["queue_size"] + 4)


def fault_state_dir_readonly(rig: Rig) -> Outcome:
    """An SD card the kernel remounted read-only, then a restart. A live remount is refused
    (EBUSY) while the daemon holds the store open for writing, so the daemon is stopped first:
    it must come up degraded (its answered store in RAM) and answer on a read-only state dir;
    the restart after the remount takes those replies over."""
    if not rig.tmpfs:
        return True, "skipped: needs root for a tmpfs state dir", None
    rig.daemon.signal(signal.SIGTERM)
    _run(["mount", "-o", "remount,ro", str(rig.state_dir)])
    try:
        up, note, ready = _restart(rig, "restarted on a read-only state dir")
        probe = rig.load.query()
        answered = up and _wait_final(rig, probe, 15.0)
        note += f": ready {up}, a query answered {answered}"
    finally:
        rig.daemon.signal(signal.SIGTERM)
        _run(["mount", "-o", "remount,rw", str(rig.state_dir)])
        back = rig.daemon.start()
    return up and answered and back, note, ready


CLOCK_JUMP_S = 2 * 3600
"""Each wall_clock_jump sets the daemon's clock this far ahead of the real one, then as far
behind: longer than the vitals window (60 s here, 30 min by default) and the alert cooldown,
shorter than the answered store's TTL (24 h)."""
CLOCK_WEARER = "clock-w"


def set_clock_offset(path: Path, seconds: float) -> None:
    """Move the daemon's wall clock (tools/clockshift.c reads this on every call)."""
    with path.open("r+b") as f:
        f.write(struct.pack("=q", int(seconds * 1e9)))


def build_clockshift(workdir: Path) -> Path | None:
    """tools/clockshift.c compiled for this machine, or None (no C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        say("no C compiler: wall_clock_jump is skipped")
        return None
    out = workdir / "clockshift.so"
    source = REPO / "tools" / "clockshift.c"
    done = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        say(f"cannot build {source.name}: wall_clock_jump is skipped\n{done.stderr}")
        return None
    return out


def fault_wall_clock_jump(rig: Rig) -> Outcome:
    """The daemon's wall clock set an hour or more forward or back (NTP correcting a Pi that
    booted without a real-time clock), with a deadline and a vitals window in flight. Then:
    the node's status carries the new time (the jump took), the daemon logs the step, the query
    is answered with advice (deadlines run on the monotonic clock), that advice still sees the
    summary sent before the jump (so does the window), and a query answered before the jump,
    sent again, gets its stored reply (the ledger checks the copies are byte-identical)."""
    if rig.clock_file is None:
        return True, "skipped: tools/clockshift.c could not be built", None
    jumps = sum(f.kind == "wall_clock_jump" for f in rig.faults)
    offset = CLOCK_JUMP_S if jumps % 2 == 0 else -CLOCK_JUMP_S
    with rig.ledger.lock:
        answered = [q for q in rig.ledger.queries.values() if len(q.finals) == 1]
    again = answered[-1] if answered else None
    summary = {"ts": time.time(), "heart_rate": 80, "spo2": 97, "resp_rate": 16}
    rig.gateway.publish(f"{P}/{CLOCK_WEARER}/vitals", json.dumps(summary).encode())
    time.sleep(0.5)  # handled before the jump
    timed = rig.load.query(wearer=CLOCK_WEARER, deadline_s=30.0)
    logged_before = rig.daemon.watch.poll()[CLOCK_SET]
    set_clock_offset(rig.clock_file, offset)
    took = _status_after_jump(rig, offset)
    logged = rig.daemon.watch.wait(CLOCK_SET, logged_before, 10.0)
    if again is not None:
        rig.load._send(again)
    answered_in_time = _wait_final(rig, timed, 30.0)
    body = json.loads(timed.finals[0]) if timed.finals else {}
    advice = "text" in body
    in_window = (body.get("triage") or {}).get("news2") is not None
    resent = again is None or _wait_finals(again, 2, 30.0)
    note = (
        f"clock {offset:+.0f} s: status ts moved {took}, the step logged {logged}; "
        f"deadline query answered with advice "
        f"{answered_in_time and advice}, pre-jump vitals in its window {in_window}; "
        f"an answered query re-sent got a reply {resent}"
    )
    return took and logged and answered_in_time and advice and in_window and resent, note, None


def _status_after_jump(rig: Rig, offset: float) -> bool:
    """Whether a status the daemon publishes after the jump carries the shifted time."""
    seen = threading.Event()
    now = time.time

    def on_status(topic: str, payload: bytes) -> None:
        try:
            ts = float(json.loads(payload).get("ts"))
        except (ValueError, TypeError, AttributeError):
            return
        if abs(ts - (now() + offset)) < 30:
            seen.set()

    topic = f"{P}/_node/{rig.config['node_id']}/status"
    watcher = Client(rig.broker.port, f"soak-clock-{os.getpid()}", [topic], on_status)
    try:
        return seen.wait(3 * rig.config["status"]["interval_s"])
    finally:
        watcher.close()


FAULTS: dict[str, Callable[[Rig], Outcome]] = {
    "daemon_sigkill": fault_daemon_sigkill,
    "daemon_sigterm": fault_daemon_sigterm,
    "broker_restart": fault_broker_restart,
    "broker_sigkill": fault_broker_sigkill,
    "broker_outage": fault_broker_outage,
    "sighup_valid": fault_sighup_valid,
    "sighup_invalid": fault_sighup_invalid,
    "store_corrupt": fault_store_corrupt,
    "store_truncate": fault_store_truncate,
    "state_dir_full": fault_state_dir_full,
    "state_dir_full_long": fault_state_dir_full_long,
    "state_dir_readonly": fault_state_dir_readonly,
    "wall_clock_jump": fault_wall_clock_jump,
}


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, timeout=30, capture_output=True)


# -- measurements ------------------------------------------------------------------------------


def sample_process(rig: Rig, stop: threading.Event) -> None:
    while not stop.wait(rig.p.sample_every_s):
        pid = rig.daemon.pid
        if pid is None or (got := read_sample(pid)) is None:
            continue
        rss, fds = got
        rig.samples.append((time.monotonic(), pid, rss, fds))


def read_sample(pid: int) -> tuple[int, int] | None:
    """VmRSS (kB) and open fds of `pid`; None once it has exited, or while it has exited and
    is not reaped yet: a zombie's status has no VmRSS (a daemon SIGKILLed between two reads
    of this once ended the sampling thread, and the slope then came from the samples before)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    kb = next(rss, None)
    return None if kb is None else (kb, fds)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value), per hour."""
    fit = _fit(points)
    return None if fit is None else fit[0] * 3600


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """Least-squares (slope per second, intercept, sum of squares of x about its mean)."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx, sxx


# Two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (then the normal 1.96).
_T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14,
         2.13, 2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05,
         2.05, 2.04)  # fmt: skip


def slope_interval_per_hour(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The 95 % confidence interval of the least-squares slope, per hour.

    RSS samples a few seconds apart are not independent: a step (a burst the allocator keeps)
    leaves every later residual on one side of the line. The interval is therefore widened by
    the residuals' lag-1 autocorrelation r (effective sample size n (1 - r) / (1 + r)), the
    usual correction for a trend in a time series. A leak, which climbs at a steady rate,
    leaves residuals of sampling noise only and a narrow interval above 0; a series that is
    flat apart from a few steps gets an interval as wide as the steps make it.
    """
    fit = _fit(points)
    if fit is None or len(points) < 8:
        return None
    slope, intercept, sxx = fit
    res = [y - (intercept + slope * x) for x, y in points]
    ss = sum(r * r for r in res)
    if ss == 0:
        return slope * 3600, slope * 3600
    r1 = min(max(sum(a * b for a, b in zip(res, res[1:], strict=False)) / ss, 0.0), 0.98)
    n_eff = len(points) * (1 - r1) / (1 + r1)
    df = max(int(n_eff) - 2, 1)
    se = math.sqrt(ss / (len(points) - 2) / sxx * (1 + r1) / (1 - r1))
    half = (_T975[df - 1] if df <= len(_T975) else 1.96) * se
    return (slope - half) * 3600, (slope + half) * 3600


def settled_from(started_s: float, faults: list[tuple[str, float]], warmup_s: float) -> float:
    """When a process's memory has met everything it will meet: `warmup_s` after it started,
    and SETTLE_S after the first of each kind of fault (kind, end seconds) that ended while it
    ran. A burst of a kind not seen before (a reconnect backlog, a reload) raises the high-water
    of Python's 1 MiB arenas and of glibc's heaps once; a leak grows again at every later one of
    the same kind, and those stay in the segment."""
    first: dict[str, float] = {}
    for kind, end_s in sorted(faults, key=lambda f: f[1]):
        if end_s >= started_s:
            first.setdefault(kind, end_s)
    return max([started_s + warmup_s, *(end + SETTLE_S for end in first.values())])


def memory_report(rig: Rig) -> dict[str, Any]:
    by_pid: dict[int, list[tuple[float, int, int, int]]] = {}
    for s in rig.samples:
        by_pid.setdefault(s[1], []).append(s)
    longest = max(by_pid.values(), key=lambda s: s[-1][0] - s[0][0], default=[])
    life = (longest[0][0] - rig.started, longest[-1][0] - rig.started) if longest else (0, 0)
    met = [(f.kind, f.end_s) for f in rig.faults if f.end_s is not None and f.end_s <= life[1]]
    start_s = settled_from(life[0], met, rig.p.warmup_s)
    warm = [s for s in longest if s[0] - rig.started >= start_s]
    rss = [s[2] for s in rig.samples]
    fds = [s[3] for s in rig.samples]
    # A leak climbs at the same rate throughout; a cache filling up slows down. The slope over
    # the segment's second half tells them apart.
    late = warm[len(warm) // 2 :]
    interval = slope_interval_per_hour([(s[0], s[2]) for s in warm])
    in_segment = collections.Counter(f.kind for f in rig.faults if start_s <= f.at_s <= life[1])
    return {
        "rss_slope_kb_per_hour": _round(slope_per_hour([(s[0], s[2]) for s in warm])),
        "rss_slope_second_half_kb_per_hour": _round(slope_per_hour([(s[0], s[2]) for s in late])),
        "rss_slope_ci95_kb_per_hour": [_round(v) for v in interval] if interval else None,
        "rss_slope_within_noise": interval[0] <= 0 <= interval[1] if interval else None,
        "fd_slope_per_hour": _round(slope_per_hour([(s[0], s[3]) for s in warm])),
        "rss_slope_segment": {
            "method": "least squares over the longest-lived daemon process, from "
            f"{rig.p.warmup_s:.0f} s after it started and {SETTLE_S:.0f} s after the first of "
            "each kind of fault it met, whichever is later",
            "process_s": [round(v, 1) for v in life],
            "from_s": round(start_s, 1),
            "seconds": round(warm[-1][0] - warm[0][0], 1) if warm else 0,
            "samples": len(warm),
            "processes": len(by_pid),
            "faults": dict(sorted(in_segment.items())),
        },
        # (seconds, VmRSS kB, open fds) of the segment the slopes are taken over
        "rss_series": [[round(s[0] - warm[0][0], 1), s[2], s[3]] for s in warm],
        "rss_kb": {"min": min(rss, default=None), "max": max(rss, default=None)},
        "open_fds": {"min": min(fds, default=None), "max": max(fds, default=None)},
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def measure_fsyncs(rig: Rig) -> None:
    """strace the daemon's fsync/fdatasync calls for a window, and count the answers in it."""
    pid = rig.daemon.pid
    if pid is None:
        return
    out = rig.workdir / "strace.txt"
    cmd = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out), "-p", str(pid)]
    try:
        tracer = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        say("strace is not installed (apt-get install strace): no fsync figure")
        return
    time.sleep(0.5)
    t0 = time.monotonic()
    time.sleep(rig.p.fsync_window_s)
    t1 = time.monotonic()
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    calls = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        cols = line.split()
        if cols and cols[-1] in ("fsync", "fdatasync") and len(cols) >= 5:
            calls += int(cols[3])
    answers = rig.ledger.finals_between(t0, t1)
    rig.fsync_windows.append((calls, answers))
    say(f"fsync window: {calls} fsync/fdatasync calls, {answers} answers")


# -- the end check -----------------------------------------------------------------------------


def query_report(led: Ledger) -> dict[str, Any]:
    with led.lock:
        queries = list(led.queries.values())
    accepted = [q for q in queries if q.accepted]
    lost = [f"{q.wearer}/{q.qid}" for q in accepted if not q.finals]
    dups = [q for q in queries if len(q.finals) > 1]
    differ = [q for q in dups if any(f != q.finals[0] for f in q.finals)]
    different = [f"{q.wearer}/{q.qid}" for q in differ]
    return {
        "queries_sent": len(queries),
        "queries_accepted": len(accepted),
        "queries_answered": sum(1 for q in queries if q.finals),
        "lost_queries": len(lost),
        "lost_query_ids": lost[:50],
        "duplicated_queries": len(dups),
        "nonidentical_duplicates": len(different),
        "nonidentical_duplicate_ids": different[:50],
        "nonidentical_examples": [
            {
                "query": f"{q.wearer}/{q.qid}",
                "copies": [f.decode(errors="replace") for f in q.finals],
            }
            for q in differ[:3]
        ],
        "busy_replies": sum(q.busy for q in queries),
        "unexpected_replies": led.unexpected[:50],
        "stream_chunks": led.stream_chunks,
    }


def stored_report(rig: Rig) -> dict[str, Any]:
    """Every final reply received since the store was last damaged on purpose is in the
    daemon's answered store, byte for byte, read from the SQLite file itself: each was stored
    before it went out, and a query is acknowledged only once its reply is out, so no query was
    acknowledged without a stored reply."""
    with rig.ledger.lock:
        sent = [
            q
            for q in rig.ledger.queries.values()
            if q.finals and (q.first_final_at or 0.0) > rig.store_reset_at
        ]
    path = rig.state_dir / STORE_FILE
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT wearer, id, payload FROM answered").fetchall()
    finally:
        db.close()
    stored = {(wearer, qid): bytes(payload) for wearer, qid, payload in rows}
    unstored = [f"{q.wearer}/{q.qid}" for q in sent if stored.get((q.wearer, q.qid)) != q.finals[0]]
    return {
        "replies_checked_in_store": len(sent),
        "replies_sent_unstored": len(unstored),
        "replies_sent_unstored_ids": unstored[:50],
    }


def alert_report(led: Ledger) -> dict[str, Any]:
    with led.lock:
        accepted = [a for a, s in led.summaries.items() if broker_has(s.info)]
        lost = [f"{led.summaries[a].wearer}:{a}" for a in accepted if not led.alerts[a]]
        return {
            "alerts_expected": len(accepted),
            "alerts_raised": sum(1 for a in accepted if led.alerts[a]),
            "lost_alerts": len(lost),
            "lost_alert_ids": lost[:50],
            "duplicate_alerts": sum(n - 1 for a, n in led.alerts.items() if a in led.summaries),
            "alerts_from_load_wearers": sum(1 for a in led.alerts if a not in led.summaries),
            "fuzz_sent": sum(led.fuzz_sent.values()),
            "fuzz_sent_by_kind": dict(led.fuzz_sent),
            "fuzz_error_replies": dict(led.fuzz_replies),
            "node_error_replies": dict(led.node_errors),
            "fuzz_taken_as_queries": led.fuzz_advice,
        }


def build_report(rig: Rig) -> dict[str, Any]:
    faults = Counter(f.kind for f in rig.faults)
    failed = Counter(f.kind for f in rig.faults if not f.ok)
    calls, answers = (sum(w[i] for w in rig.fsync_windows) for i in (0, 1))
    ready = sorted(rig.daemon.ready_s)
    report: dict[str, Any] = {
        "profile": rig.p.name,
        "duration_s": rig.p.duration_s,
        "wall_s": round(time.monotonic() - rig.started, 1),
        **query_report(rig.ledger),
        **alert_report(rig.ledger),
        **stored_report(rig),
        "faults": dict(faults),
        "faults_not_recovered": dict(failed),
        "fault_log": [f.__dict__ for f in rig.faults],
        "unexpected_daemon_exits": rig.daemon.unexpected_exits,
        **memory_report(rig),
        "fsyncs_per_answer": round(calls / answers, 2) if answers else None,
        "fsync_method": f"strace -f -c over {len(rig.fsync_windows)} window(s) of "
        f"{rig.p.fsync_window_s:.0f} s: {calls} fsync+fdatasync calls / {answers} first final "
        "replies received in the same windows",
        "restart_to_ready_s": {
            "n": len(ready),
            "p50": round(ready[len(ready) // 2], 2) if ready else None,
            "max": round(ready[-1], 2) if ready else None,
        },
    }
    report["ok"] = not (
        report["lost_queries"]
        or report["lost_alerts"]
        or report["nonidentical_duplicates"]
        or report["replies_sent_unstored"]
        or failed
        or rig.daemon.unexpected_exits
        or report["fuzz_taken_as_queries"]
        or report["unexpected_replies"]  # an error a valid query did not ask for
        or report["fuzz_error_replies"].get("internal")  # a hostile payload broke something
    )
    return report


def format_report(r: dict[str, Any]) -> str:
    faults = ", ".join(f"{k} {n}" for k, n in sorted(r["faults"].items()))
    failed = ", ".join(f"{k} {n}" for k, n in sorted(r["faults_not_recovered"].items())) or "none"
    lines = [
        f"soak {r['profile']}: {r['wall_s']} s",
        f"queries   sent {r['queries_sent']}, accepted {r['queries_accepted']}, answered "
        f"{r['queries_answered']}, LOST {r['lost_queries']}, duplicated {r['duplicated_queries']}"
        f" (non-identical {r['nonidentical_duplicates']}), busy replies {r['busy_replies']}",
        f"alerts    expected {r['alerts_expected']}, raised {r['alerts_raised']}, LOST "
        f"{r['lost_alerts']}, duplicates {r['duplicate_alerts']}",
        f"fuzz      sent {r['fuzz_sent']}, error replies {sum(r['fuzz_error_replies'].values())}, "
        f"taken as queries {r['fuzz_taken_as_queries']}",
        f"stored    {r['replies_checked_in_store']} final replies looked up in the answered "
        f"store, SENT UNSTORED {r['replies_sent_unstored']}",
        f"faults    {faults}; not recovered: {failed}",
        f"daemon    unexpected exits {len(r['unexpected_daemon_exits'])}, restart-to-ready "
        f"p50 {r['restart_to_ready_s']['p50']} s max {r['restart_to_ready_s']['max']} s",
        f"memory    RSS {r['rss_kb']['min']}..{r['rss_kb']['max']} kB, {_slope_text(r)}; fds "
        f"{r['open_fds']['min']}..{r['open_fds']['max']}",
        f"fsync     {r['fsyncs_per_answer']} per answer ({r['fsync_method']})",
    ]
    lines += [f"unexpected {u}" for u in r["unexpected_replies"][:10]]
    lines.append(f"result    {'OK' if r['ok'] else 'FAILED'}")
    return "\n".join(lines)


def _slope_text(r: dict[str, Any]) -> str:
    seg = r["rss_slope_segment"]
    if r["rss_slope_ci95_kb_per_hour"] is None:
        # The quick profile's tail: its process meets a new kind of fault nearly to the end.
        life = seg["process_s"]
        return (
            f"no slope: {seg['samples']} samples of the longest-lived process "
            f"({life[0]}-{life[1]} s) after its warm-up and the first of each kind of fault "
            f"it met ({seg['from_s']} s)"
        )
    return (
        f"slope {r['rss_slope_kb_per_hour']} kB/h over {seg['seconds']} s from {seg['from_s']} s "
        f"(95 % interval {r['rss_slope_ci95_kb_per_hour']}, within noise: "
        f"{r['rss_slope_within_noise']}; {r['rss_slope_second_half_kb_per_hour']} kB/h over "
        f"its second half; faults in it: {seg['faults']})"
    )


# -- the run -----------------------------------------------------------------------------------


def daemon_config(port: int, state_dir: Path, p: Profile) -> dict[str, Any]:
    return {
        "node_id": "soak-node",
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            "connect_timeout_s": 3,
        },
        "model": {"path": str(TINY_QWEN3_INT4), "context_length": 1024, "threads": 1},
        "limits": {"default_max_tokens": p.max_tokens, "queue_size": 32},
        "delivery": {"state_dir": str(state_dir)},
        "status": {"interval_s": 5},
        "streaming": {"interval_ms": 20, "max_tokens": 1},
        "governor": {"pause_ms": p.pause_ms},
        # 0: every alert-worthy summary alerts (alerts.should_alert), so each one is checkable.
        # The shortest vitals window (60 s) fills within the warm-up; with the default 30 min
        # the RSS grows for half an hour as the windows fill, which is no leak.
        "clinical": {"alert_cooldown_s": 0, "window_s": 60},
    }


def mount_state_dir(state_dir: Path) -> bool:
    """A small tmpfs of its own (root only), so that ENOSPC and read-only hit only the store."""
    state_dir.mkdir(parents=True)
    if os.geteuid() != 0:
        say("not root: state dir faults (ENOSPC, read-only) are skipped")
        return False
    try:
        _run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state_dir)])
    except (subprocess.SubprocessError, OSError) as exc:
        say(f"cannot mount a tmpfs ({exc}): state dir faults are skipped")
        return False
    return True


def run_faults(rig: Rig) -> None:
    """The fault cycle until the duration is over; the fsync windows and (long profile) the
    broker outages come at their own times."""
    end = rig.started + rig.p.duration_s
    next_fsync = rig.started + FIRST_FSYNC_S
    next_outage = rig.started + OUTAGE_EVERY_S / 3
    quiet = min(rig.p.quiet_tail_s, rig.p.duration_s / 3)
    tail_outage = rig.p.name == "long" and quiet > 0
    i = 0
    while time.monotonic() < end:
        _pause(rig, min(rig.p.fault_every_s, end - time.monotonic()))
        now = time.monotonic()
        if now >= end:
            break
        if tail_outage and now >= end - quiet:
            next_outage, tail_outage = now, False
        if now >= next_fsync:
            measure_fsyncs(rig)
            next_fsync = time.monotonic() + rig.p.fsync_every_s
        elif rig.p.name == "long" and now >= next_outage:
            run_fault(rig, "broker_outage")
            next_outage = time.monotonic() + OUTAGE_EVERY_S
        else:
            cycle = QUIET_CYCLE if now >= end - quiet else rig.p.cycle
            run_fault(rig, cycle[i % len(cycle)])
            i += 1


def _pause(rig: Rig, seconds: float) -> None:
    deadline = time.monotonic() + max(seconds, 0.0)
    while time.monotonic() < deadline:
        rig.daemon.check_alive()
        if time.monotonic() >= rig.next_progress:
            say(progress_line(rig))
            rig.next_progress = time.monotonic() + PROGRESS_EVERY_S
        time.sleep(0.2)


def progress_line(rig: Rig) -> str:
    led = rig.ledger
    with led.lock:
        sent = len(led.queries)
        answered = sum(1 for q in led.queries.values() if q.finals)
        alerts = len(led.alerts)
        fuzz = sum(led.fuzz_sent.values())
    rss = f"{rig.samples[-1][2]} kB" if rig.samples else "?"
    return (
        f"{time.monotonic() - rig.started:7.1f} s  progress: queries {answered}/{sent} answered, "
        f"alerts {alerts}, fuzz {fuzz}, faults {len(rig.faults)}, RSS {rss}"
    )


def run_fault(rig: Rig, kind: str) -> None:
    at = time.monotonic() - rig.started
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        ok, note, ready = FAULTS[kind](rig)
    except Exception as exc:  # a fault that cannot be carried out is a failed fault, not a crash
        ok, note, ready = False, f"{type(exc).__name__}: {exc}", None
    if ok and rig.daemon.pid is None:
        ok, note = False, note + "; daemon not running afterwards"
    end = round(time.monotonic() - rig.started, 1)
    rig.faults.append(FaultRecord(kind, stamp, round(at, 1), ok, note, _round(ready), end))
    say(f"{at:7.1f} s  {kind:<20} {'ok' if ok else 'FAILED'}  {note}")


def drain(rig: Rig) -> None:
    # A gateway keeps retrying a query answered `busy` (API.md): stopping the load thread at
    # once left such a query unanswered and counted lost (found by an 8-outage run).
    rig.load.quiet.set()
    try:
        deadline = time.monotonic() + rig.p.drain_s
        while time.monotonic() < deadline:
            rig.daemon.check_alive()
            left = rig.ledger.outstanding()
            if left == 0:
                return
            say(f"draining: {left} queries/alerts outstanding")
            time.sleep(2.0)
    finally:
        rig.load.stop.set()
        rig.load.thread.join(10)


def soak(p: Profile, workdir: Path) -> dict[str, Any]:
    state_dir = workdir / "state"
    tmpfs = mount_state_dir(state_dir)
    # At DEBUG the broker logs every packet too (PUBLISH and PUBACK with their packet ids).
    broker_log = ("log_type all",) if p.debug_log else ()
    broker = PrivateBroker(workdir=workdir / "broker", extra_config=broker_log)
    (workdir / "broker").mkdir()
    broker.start()
    notify = NotifySocket(workdir / "notify.sock")
    # As systemd sets them: the notify socket, the watchdog, the RuntimeDirectory (where the
    # answered store goes when the state dir cannot be written).
    env = {
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "4000000",
        "RUNTIME_DIRECTORY": str(workdir / "run"),
    }
    clock_file = None
    if "wall_clock_jump" in {*p.cycle, *(QUIET_CYCLE if p.quiet_tail_s else ())}:
        shim = build_clockshift(workdir)
        if shim is not None:
            clock_file = workdir / "clock-offset"
            clock_file.touch()
            set_clock_offset(clock_file, 0)
            env.update(LD_PRELOAD=str(shim), EDGED_CLOCKSHIFT_FILE=str(clock_file))
    daemon = Daemon(workdir, env, debug=p.debug_log)
    rig = Rig(
        p,
        workdir,
        broker,
        daemon,
        notify,
        daemon_config(broker.port, state_dir, p),
        state_dir,
        tmpfs,
        clock_file,
    )
    stop_sampling = threading.Event()
    try:
        rig.write_config()
        if not daemon.start():
            raise RuntimeError(f"the daemon never became ready; see {daemon.log_path}")
        say(f"daemon ready in {daemon.ready_s[-1]:.1f} s; {p.name} profile, {p.duration_s:.0f} s")
        subs = [
            f"{P}/+/reply/#",
            f"{P}/+/alert",
            f"{P}/+/error",
            f"{P}/+/advice",
            f"{P}/_node/+/error",
        ]
        rig.gateway = Client(
            broker.port, f"soak-gateway-{os.getpid()}", subs, rig.ledger.on_message
        )
        rig.fuzzer = Client(broker.port, f"soak-fuzz-{os.getpid()}", [], lambda t, b: None)
        rig.load = Load(rig)
        rig.started = time.monotonic()
        rig.next_progress = rig.started + PROGRESS_EVERY_S
        rig.load.thread.start()
        threading.Thread(target=sample_process, args=(rig, stop_sampling), daemon=True).start()
        run_faults(rig)
        drain(rig)
        return build_report(rig)
    finally:
        stop_sampling.set()
        _teardown(rig)


def _teardown(rig: Rig) -> None:
    for client in ("gateway", "fuzzer"):
        with contextlib.suppress(AttributeError):
            getattr(rig, client).close()
    rig.daemon.stop()
    rig.broker.close()
    rig.notify.close()
    if rig.tmpfs:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(["umount", str(rig.state_dir)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_true", help="a few minutes; CI-sized")
    which.add_argument("--long", action="store_true", help="an hour")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--duration", type=float, help="override the profile's duration (s)")
    ap.add_argument("--outage", type=float, help="override the broker outage length (s)")
    ap.add_argument("--fault-every", type=float, help="override the pause between faults (s)")
    ap.add_argument(
        "--faults",
        help="comma-separated fault kinds to cycle through instead of the profile's "
        f"(known: {', '.join(FAULTS)})",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    ap.add_argument(
        "--debug",
        action="store_true",
        help="the daemon logs at DEBUG (every packet id received and acked); use with --keep",
    )
    args = ap.parse_args(argv)
    p = PROFILES["quick" if args.quick else "long"]
    if args.duration is not None:
        p = replace(p, duration_s=args.duration)
    if args.outage is not None:
        p = replace(p, outage_s=args.outage)
    if args.fault_every is not None:
        p = replace(p, fault_every_s=args.fault_every)
    if args.debug:
        p = replace(p, debug_log=True)
    if args.faults:
        cycle = tuple(args.faults.split(","))
        unknown = [k for k in cycle if k not in FAULTS]
        if unknown:
            ap.error(f"--faults: unknown kind(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
        p = replace(p, cycle=cycle, quiet_tail_s=0.0)  # the cycle asked for, to the end
    workdir = Path(tempfile.mkdtemp(prefix="edged-soak-"))
    say(f"work dir {workdir}")
    report = soak(p, workdir)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep and report["ok"]:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
