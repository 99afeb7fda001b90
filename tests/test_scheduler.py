"""The scheduler on its own: ordering, backpressure, rate estimates, cancellation, deadlines,
shutdown. No broker, no worker; the only thread is the one blocked in `next_job`."""

from __future__ import annotations

import threading
import time

import pytest

from edged.domain import Priority
from edged.scheduler import (
    SERVE_ORDER,
    Job,
    QueueFull,
    Scheduler,
    SchedulerClosed,
    estimate_wait_ms,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_job(
    query_id: str,
    priority: Priority = Priority.NORMAL,
    max_tokens: int = 100,
    deadline_at: float | None = None,
    wearer: str = "w1",
) -> Job:
    return Job(wearer, query_id, priority, max_tokens, 0.0, deadline_at)


def take_ids(sched: Scheduler) -> list[str]:
    ids: list[str] = []
    while (job := sched.next_job(timeout=0)) is not None:
        ids.append(job.query_id)
    return ids


def test_every_priority_has_a_place_in_the_serve_order() -> None:
    assert set(SERVE_ORDER) == set(Priority)
    assert SERVE_ORDER[0] is Priority.URGENT


def test_urgent_queries_are_served_before_normal_ones_and_fifo_within_a_priority() -> None:
    sched = Scheduler(capacity=10)
    sched.submit(make_job("n1"))
    sched.submit(make_job("u1", Priority.URGENT))
    sched.submit(make_job("n2"))
    sched.submit(make_job("u2", Priority.URGENT))
    sched.submit(make_job("n3"))
    assert take_ids(sched) == ["u1", "u2", "n1", "n2", "n3"]


def test_next_job_marks_the_job_running() -> None:
    sched = Scheduler(capacity=2)
    job = make_job("a")
    sched.submit(job)
    assert sched.next_job(timeout=0) is job
    assert sched.running is job
    assert len(sched) == 0


def test_a_full_queue_refuses_with_a_retry_estimate_from_the_running_jobs_tokens_left() -> None:
    sched = Scheduler(capacity=1, initial_decode_tps=10.0, initial_prefill_ms=500.0)
    sched.submit(make_job("running", max_tokens=200))
    assert sched.next_job(timeout=0) is not None
    sched.progress(50)
    sched.submit(make_job("queued", max_tokens=300))
    with pytest.raises(QueueFull) as refused:
        sched.submit(make_job("refused"))
    # 50 tokens left at 10 tok/s, plus one query's 500 ms overhead.
    assert refused.value.retry_after_ms == 5500
    assert refused.value.capacity == 1
    assert len(sched) == 1


def test_the_retry_estimate_uses_the_measured_decode_rate() -> None:
    sched = Scheduler(capacity=1, initial_decode_tps=10.0, initial_prefill_ms=500.0)
    first = make_job("first")
    sched.submit(first)
    sched.next_job(timeout=0)
    sched.finish(first, decode_tps=2.0, prefill_ms=500.0)
    sched.submit(make_job("running", max_tokens=100))
    sched.next_job(timeout=0)
    sched.progress(40)
    sched.submit(make_job("queued"))
    with pytest.raises(QueueFull) as refused:
        sched.submit(make_job("refused"))
    expected = estimate_wait_ms(40, sched.decode_tps, sched.prefill_ms, 1)
    assert refused.value.retry_after_ms == expected
    assert expected != estimate_wait_ms(40, 10.0, 500.0, 1)


def test_with_nothing_running_the_retry_estimate_counts_the_head_of_the_queue() -> None:
    sched = Scheduler(capacity=2, initial_decode_tps=10.0, initial_prefill_ms=500.0)
    sched.submit(make_job("head", max_tokens=30))
    sched.submit(make_job("tail", max_tokens=80))
    with pytest.raises(QueueFull) as refused:
        sched.submit(make_job("refused"))
    assert refused.value.retry_after_ms == 3500  # 30 tokens / 10 tok/s + 500 ms


def test_finish_folds_measured_rates_into_moving_averages() -> None:
    sched = Scheduler(capacity=2, initial_decode_tps=10.0, initial_prefill_ms=500.0)
    job = make_job("a")
    sched.submit(job)
    sched.next_job(timeout=0)
    sched.finish(job, decode_tps=20.0, prefill_ms=1000.0)
    assert sched.running is None
    assert sched.decode_tps == pytest.approx(0.7 * 10.0 + 0.3 * 20.0)
    assert sched.prefill_ms == pytest.approx(0.7 * 500.0 + 0.3 * 1000.0)
    folded = (sched.decode_tps, sched.prefill_ms)
    sched.finish(job)  # nothing measured (e.g. cancelled before decoding): nothing folded
    assert (sched.decode_tps, sched.prefill_ms) == folded


def test_cancelling_a_queued_job_removes_it() -> None:
    sched = Scheduler(capacity=5)
    keep, drop = make_job("keep"), make_job("drop")
    sched.submit(keep)
    sched.submit(drop)
    assert sched.cancel(drop) is True
    assert len(sched) == 1
    assert take_ids(sched) == ["keep"]


def test_cancelling_the_running_job_flags_it_and_returns_false() -> None:
    sched = Scheduler(capacity=5)
    job = make_job("a")
    sched.submit(job)
    sched.next_job(timeout=0)
    assert sched.cancel(job) is False
    assert job.cancelled is True
    assert sched.running is job


def test_jobs_compare_by_identity_so_cancelling_one_keeps_an_equal_looking_other() -> None:
    sched = Scheduler(capacity=5)
    first, twin = make_job("same"), make_job("same")
    assert first != twin
    sched.submit(first)
    sched.submit(twin)
    assert sched.cancel(twin) is True
    assert len(sched) == 1
    assert sched.next_job(timeout=0) is first
    assert first.cancelled is False


def test_take_expired_removes_only_queued_jobs_past_their_deadline() -> None:
    clock = FakeClock(0.0)
    sched = Scheduler(capacity=10, clock=clock)
    running = make_job("running", deadline_at=5.0)
    sched.submit(running)
    sched.next_job(timeout=0)
    late = make_job("late", deadline_at=10.0)
    urgent_late = make_job("urgent-late", Priority.URGENT, deadline_at=15.0)
    later = make_job("later", deadline_at=20.0)
    never = make_job("never")
    for job in (late, urgent_late, later, never):
        sched.submit(job)
    assert sched.take_expired() == []
    clock.now = 15.0  # a deadline is passed from its instant on
    assert {j.query_id for j in sched.take_expired()} == {"late", "urgent-late"}
    assert sched.running is running
    assert take_ids(sched) == ["later", "never"]


def test_drain_queued_returns_queued_jobs_keeps_the_running_one_and_closes_submit() -> None:
    sched = Scheduler(capacity=10)
    running = make_job("running")
    sched.submit(running)
    sched.next_job(timeout=0)
    sched.submit(make_job("n1"))
    sched.submit(make_job("u1", Priority.URGENT))
    drained = sched.drain_queued()
    assert [j.query_id for j in drained] == ["u1", "n1"]
    assert len(sched) == 0
    assert sched.running is running
    with pytest.raises(SchedulerClosed):
        sched.submit(make_job("late"))


def test_close_wakes_a_worker_blocked_in_next_job() -> None:
    sched = Scheduler(capacity=2)
    results: list[Job | None] = []
    started = threading.Event()

    def worker() -> None:
        started.set()
        results.append(sched.next_job())

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert started.wait(timeout=2.0)
    sched.close()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    assert results == [None]
    with pytest.raises(SchedulerClosed):
        sched.submit(make_job("after-close"))


def test_next_job_returns_none_after_its_timeout_when_empty() -> None:
    sched = Scheduler(capacity=2)
    start = time.monotonic()
    assert sched.next_job(timeout=0.05) is None
    elapsed = time.monotonic() - start
    assert 0.04 <= elapsed < 2.0


def test_estimate_wait_ms_is_tokens_over_rate_plus_per_query_overhead() -> None:
    assert estimate_wait_ms(50, 10.0, 500.0, 1) == 5500
    assert estimate_wait_ms(50, 10.0, 500.0, 3) == 6500
    assert estimate_wait_ms(0, 10.0, 500.0, 0) == 0
    assert estimate_wait_ms(1, 3.0, 0.0, 0) == 334  # rounded up, never promised too early


def test_estimate_wait_ms_survives_a_decode_rate_of_zero() -> None:
    wait = estimate_wait_ms(50, 0.0, 500.0, 1)
    assert isinstance(wait, int)
    assert wait > estimate_wait_ms(50, 10.0, 500.0, 1)
