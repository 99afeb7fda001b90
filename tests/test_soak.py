"""tools/soak.py (issue #16): a short quick soak against a real mosquitto and the real daemon
loses nothing through kills, broker restarts and outages, reloads and a fuzz stream; and the
end check it relies on does catch a lost query, a lost alert and a duplicate that differs.

The soak runs as a subprocess, as CI and operators run it: it starts and kills daemons and
brokers of its own, which is no business of the test process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from tests._models import REPO_ROOT, load_tool

TOOL = REPO_ROOT / "tools" / "soak.py"
soak = load_tool("soak")

# The faults that must recover today. store_corrupt and store_truncate found a daemon that
# would not start (fixed: the damaged store is set aside); state_dir_full (root only, so not
# here) found replies sent unstored and generated again (fixed: held until stored,
# tests/test_state_dir_faults.py); state_dir_readonly (root only) stopped the start (fixed: the
# node serves degraded from a store in RAM, tests/test_degraded_store.py); wall_clock_jump found
# the vitals window on the wall clock (fixed: monotonic, tests/test_handlers.py).
CORE_FAULTS = (
    "state_dir_readonly",
    "store_corrupt",
    "store_truncate",
    "daemon_sigkill",
    "broker_restart",
    "sighup_valid",
    "daemon_sigterm",
    "broker_sigkill",
    "sighup_invalid",
    "broker_outage",
    "wall_clock_jump",
)


def test_quick_soak_loses_no_query_or_alert_through_kills_restarts_reloads_and_fuzz(
    tmp_path: Path,
) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--duration", "60", "--outage", "3",
         "--fault-every", "1",
         "--faults", ",".join(CORE_FAULTS), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["lost_queries"] == 0
    assert report["lost_alerts"] == 0
    assert report["nonidentical_duplicates"] == 0
    assert report["replies_sent_unstored"] == 0 and report["replies_checked_in_store"] >= 5
    assert report["unexpected_daemon_exits"] == []
    assert report["fuzz_taken_as_queries"] == 0
    assert report["queries_accepted"] >= 10 and report["alerts_expected"] >= 5
    assert report["fuzz_sent"] >= 400 and sum(report["fuzz_error_replies"].values()) > 0
    assert "internal" not in report["fuzz_error_replies"]
    # Every fault of the cycle ran at least once and came back.
    assert set(report["faults"]) == set(CORE_FAULTS), report["fault_log"]
    assert report["faults_not_recovered"] == {}
    # The daemon's wall clock really moved (its status said so), both ways, unless no C
    # compiler could build tools/clockshift.c.
    jumps = [f["note"] for f in report["fault_log"] if f["kind"] == "wall_clock_jump"]
    if shutil.which("cc") or shutil.which("gcc"):
        assert all("status ts moved True" in note for note in jumps), jumps
    assert report["restart_to_ready_s"]["n"] >= 3
    assert report["rss_kb"]["max"] > 0 and "rss_slope_kb_per_hour" in report
    if shutil.which("strace"):
        # SQLite WAL + synchronous=FULL: about one fsync per stored answer (SD-card wear).
        assert report["fsyncs_per_answer"] is not None
        assert 0.5 <= report["fsyncs_per_answer"] <= 4
    assert "result    OK" in run.stdout


def _published(mid: int) -> mqtt.MQTTMessageInfo:
    info = mqtt.MQTTMessageInfo(mid)
    info._set_as_published()
    return info


def test_the_end_check_finds_a_lost_query_a_lost_alert_and_a_different_duplicate() -> None:
    led = soak.Ledger()
    for n, wearer in enumerate(("w1", "w2", "w3")):
        led.queries[(wearer, "q1")] = soak.SentQuery(wearer, "q1", b"{}", set(), [_published(n)])
    led.summaries["a" * 32] = soak.SentSummary("al-00", _published(9))
    reply = json.dumps({"id": "q1", "text": "rest", "finish_reason": "stop"}).encode()
    led.on_message("edged/v1/w1/reply/soak", reply)
    led.on_message("edged/v1/w2/reply/soak", reply)
    led.on_message("edged/v1/w2/reply/soak", reply.replace(b"rest", b"sit"))
    busy = {"id": "q1", "code": "busy", "retry_after_ms": 100}
    led.on_message("edged/v1/w3/reply/soak", json.dumps(busy).encode())

    queries, alerts = soak.query_report(led), soak.alert_report(led)
    # w3 got only `busy`, which is not a final reply: lost unless its retry is answered.
    assert queries["lost_query_ids"] == ["w3/q1"]
    assert queries["nonidentical_duplicate_ids"] == ["w2/q1"]
    assert queries["busy_replies"] == 1 and len(led.retries) == 1
    assert alerts["lost_alerts"] == 1 and alerts["alerts_expected"] == 1


def test_the_store_check_finds_a_reply_sent_without_being_stored(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from edged.service.answer_store import AnswerStore

    store = AnswerStore(tmp_path / soak.STORE_FILE, ttl_s=3600)
    store.put("w1", "q1", "t", b"stored", None)
    store.put("w1", "q2", "t", b"stored, then a different copy was sent", None)
    store.close()
    led = soak.Ledger()
    for qid, sent in (("q1", b"stored"), ("q2", b"other"), ("q3", b"never stored")):
        q = soak.SentQuery("w1", qid, b"{}", set(), [_published(1)], [sent])
        q.first_final_at = 10.0
        led.queries[("w1", qid)] = q
    rig = SimpleNamespace(ledger=led, state_dir=tmp_path, store_reset_at=5.0)
    report = soak.stored_report(rig)  # type: ignore[arg-type]
    assert report["replies_checked_in_store"] == 3
    assert report["replies_sent_unstored_ids"] == ["w1/q2", "w1/q3"]
    # Replies first received before the store was last damaged on purpose are not checked.
    rig.store_reset_at = 20.0
    assert soak.stored_report(rig)["replies_checked_in_store"] == 0  # type: ignore[arg-type]


def test_an_error_a_query_did_not_ask_for_is_reported() -> None:
    led = soak.Ledger()
    led.queries[("w1", "q1")] = soak.SentQuery("w1", "q1", b"{}", {"deadline"}, [_published(1)])
    led.queries[("w1", "q2")] = soak.SentQuery("w1", "q2", b"{}", set(), [_published(2)])
    for qid in ("q1", "q2"):
        body = {"id": qid, "code": "deadline_exceeded", "message": "late"}
        led.on_message("edged/v1/w1/reply/soak", json.dumps(body).encode())
    assert led.unexpected == ["w1/q2: error deadline_exceeded: late"]


def test_rss_slope_is_the_least_squares_slope_per_hour() -> None:
    # 2 kB a minute, with noise that cancels out: 120 kB an hour.
    points = [(60.0 * i, 1000 + 2 * i + (1 if i % 2 else -1)) for i in range(20)]
    slope = soak.slope_per_hour(points)
    assert slope is not None and abs(slope - 120) < 5
    assert soak.slope_per_hour(points[:2]) is None


def test_a_steady_climb_is_outside_the_noise_and_a_flat_noisy_series_within_it() -> None:
    import random

    rng = random.Random(7)
    # 60 kB an hour (a slow leak: 1.4 MB a day) under 20 kB of sampling noise, every 5 s for
    # 20 minutes, as the long profile's quiet tail samples it.
    leak = [(5.0 * i, 100_000 + 60 * 5.0 * i / 3600 + rng.gauss(0, 20)) for i in range(240)]
    lo, hi = soak.slope_interval_per_hour(leak) or (0, 0)
    assert 0 < lo < 60 < hi
    flat = [(5.0 * i, 100_000 + rng.gauss(0, 20)) for i in range(240)]
    lo, hi = soak.slope_interval_per_hour(flat) or (1, 1)
    assert lo < 0 < hi
    assert soak.slope_interval_per_hour(flat[:5]) is None


def test_the_slope_starts_after_the_first_of_each_fault_and_still_sees_a_growth_per_fault() -> None:
    import random

    # A process started 100 s in; a SIGKILL that brought it up ended at 101 s, outages ended at
    # 400 and 1300 s, reloads at 200 and 500 s. The segment starts after the first outage.
    met = [("daemon_sigkill", 101.0), ("sighup_valid", 200.0), ("broker_outage", 400.0)]
    met += [("sighup_valid", 500.0), ("broker_outage", 1300.0), ("daemon_sigkill", 90.0)]
    start = soak.settled_from(100.0, met, warmup_s=70.0)
    assert start == 400.0 + soak.SETTLE_S
    assert soak.settled_from(100.0, [], warmup_s=70.0) == 170.0

    # RSS that steps 1.4 MB at the first outage only (a high-water) reads flat from there on;
    # RSS that steps at every outage (a leak per reconnect backlog) still reads as a climb.
    rng = random.Random(3)
    times = [100.0 + 5 * i for i in range(300)]
    high_water = [(t, 120_000 + (1400 if t > 400 else 0) + rng.gauss(0, 60)) for t in times]
    leak = [(t, y + (1400 if t > 1300 else 0)) for t, y in high_water]
    lo, hi = soak.slope_interval_per_hour([p for p in high_water if p[0] >= start]) or (1, 1)
    assert lo < 0 < hi
    lo, hi = soak.slope_interval_per_hour([p for p in leak if p[0] >= start]) or (0, 0)
    assert lo > 0


def test_a_killed_daemon_not_yet_reaped_is_skipped_not_fatal_to_the_sampler() -> None:
    """The sampling thread read VmRSS of a daemon SIGKILLed and not yet reaped; a zombie's status
    has none, the thread died, and the hour's RSS slope came from the samples before it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Exited and not waited for: a zombie until the wait below.
        status = Path(f"/proc/{child.pid}/status")
        deadline = time.monotonic() + 10
        while "State:\tZ" not in status.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "VmRSS" not in status.read_text()
        assert soak.read_sample(child.pid) is None
    finally:
        child.wait()
    assert soak.read_sample(child.pid) is None  # reaped: gone
    rss, fds = soak.read_sample(os.getpid()) or (0, 0)
    assert rss > 10_000 and fds > 2


def test_every_hostile_payload_is_invalid_and_on_our_topics() -> None:
    import random

    rng = random.Random(1)
    kinds = set()
    for n in range(1, 2000):
        kind, topic, payload = soak.hostile(rng, n)
        kinds.add(kind)
        assert topic.startswith("edged/"), topic
        assert "+" not in topic and "#" not in topic
        assert kind == "bad_topic" or "/fz-" in topic
    assert kinds == {*soak.FUZZ, "bad_topic"}
