"""Which query runs next: a bounded priority queue with deadlines, cancellation and backpressure.

One generation runs at a time (a 4-core board has no cores to spare for two). Urgent queries go
before normal ones, first-in first-out within a priority. A full queue refuses new work with an
estimate of when to retry, computed from the decode rate actually measured on this board.

The ordering and the estimate are pure functions; `Scheduler` only adds a lock and a condition
variable, so the delivery thread can submit and cancel while the worker waits. It knows jobs,
not deliveries: which MQTT messages a job answers is the delivery owner's business.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edged.domain import Priority

SERVE_ORDER: tuple[Priority, ...] = (Priority.URGENT, Priority.NORMAL)
"""Queues are served in this order; FIFO within each."""
_EMA_KEEP = 0.7
"""Exponential moving averages of decode rate and prefill time: adapt to throttling within a
few queries without jumping on one outlier."""


@dataclass(eq=False)
class Job:
    """A query accepted for generation. Compared by identity: two deliveries of one query are
    one job, and a queue must never remove an equal-looking other one."""

    wearer: str
    query_id: str
    priority: Priority
    max_tokens: int
    received_at: float
    """time.monotonic() at receipt; deadlines count from here (API.md)."""
    deadline_at: float | None
    work: Any = field(default=None, repr=False)
    """What the worker needs to run it (the parsed query and its reply route); opaque here."""
    cancelled: bool = False
    """Set by `Scheduler.cancel` while the job runs; the worker stops within one token."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.wearer, self.query_id)

    def expired(self, now: float) -> bool:
        return self.deadline_at is not None and now >= self.deadline_at


class QueueFull(Exception):
    def __init__(self, retry_after_ms: int, capacity: int) -> None:
        super().__init__(
            f"queue full ({capacity} queries waiting); retry after {retry_after_ms} ms"
        )
        self.retry_after_ms = retry_after_ms
        self.capacity = capacity


class SchedulerClosed(Exception):
    """The daemon is stopping: no new job is taken (its query stays at the broker)."""


def estimate_wait_ms(
    tokens_ahead: int, decode_tps: float, per_query_overhead_ms: float, queries_ahead: int
) -> int:
    """Time until a new query would start: the tokens still to decode ahead of it at the
    measured rate, plus a per-query overhead (prefill, publish)."""
    rate = max(decode_tps, 0.1)
    return int(math.ceil(tokens_ahead / rate * 1000 + queries_ahead * per_query_overhead_ms))


class Scheduler:
    def __init__(
        self,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
        initial_decode_tps: float = 5.0,
        initial_prefill_ms: float = 500.0,
    ) -> None:
        self.capacity = capacity
        self._clock = clock
        self._queues: dict[Priority, deque[Job]] = {p: deque() for p in SERVE_ORDER}
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._running_tokens_left = 0
        self.decode_tps = initial_decode_tps
        self.prefill_ms = initial_prefill_ms
        self._accepting = True
        self._closed = False

    @property
    def running(self) -> Job | None:
        return self._running

    # -- the delivery side -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job`; raise QueueFull (with a retry estimate) or SchedulerClosed."""
        with self._cond:
            if not self._accepting:
                raise SchedulerClosed()
            if len(self) >= self.capacity:
                raise QueueFull(self._retry_after_ms_locked(), self.capacity)
            self._queues[job.priority].append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> bool:
        """Cancel `job`. True when it was queued and is now removed (the caller answers it
        `cancelled`); False when it is running (flagged: it stops within one token) or was
        never here or is finished."""
        with self._cond:
            job.cancelled = True
            queue = self._queues[job.priority]
            if job in queue:
                queue.remove(job)
                return True
            return False

    def take_expired(self) -> list[Job]:
        """Remove and return queued jobs whose deadline passed (they get deadline_exceeded)."""
        now = self._clock()
        expired: list[Job] = []
        with self._cond:
            for queue in self._queues.values():
                for job in [j for j in queue if j.expired(now)]:
                    queue.remove(job)
                    expired.append(job)
        return expired

    def drain_queued(self) -> list[Job]:
        """Stop taking jobs and remove every queued (not running) one: on shutdown they stay
        unacknowledged at the broker and are redelivered to the next start."""
        with self._cond:
            self._accepting = False
            jobs = [j for p in SERVE_ORDER for j in self._queues[p]]
            for queue in self._queues.values():
                queue.clear()
            return jobs

    # -- the worker side -------------------------------------------------------------------

    def next_job(self, timeout: float | None = None) -> Job | None:
        """Block until a job is available (or timeout / close), mark it running and return it."""
        with self._cond:
            end = None if timeout is None else self._clock() + timeout
            while not self._closed:
                job = self._pop_next()
                if job is not None:
                    self._running = job
                    self._running_tokens_left = job.max_tokens
                    return job
                remaining = None if end is None else end - self._clock()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None

    def _pop_next(self) -> Job | None:
        for priority in SERVE_ORDER:
            if self._queues[priority]:
                return self._queues[priority].popleft()
        return None

    def progress(self, tokens_left: int) -> None:
        self._running_tokens_left = max(0, tokens_left)

    def finish(
        self, job: Job, decode_tps: float | None = None, prefill_ms: float | None = None
    ) -> None:
        """The running job ended; fold its measured rates into the estimates."""
        with self._cond:
            if self._running is job:
                self._running = None
                self._running_tokens_left = 0
            if decode_tps:
                self.decode_tps = _EMA_KEEP * self.decode_tps + (1 - _EMA_KEEP) * decode_tps
            if prefill_ms is not None:
                self.prefill_ms = _EMA_KEEP * self.prefill_ms + (1 - _EMA_KEEP) * prefill_ms
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._accepting = False
            self._cond.notify_all()

    # -- introspection ---------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def retry_after_ms(self) -> int:
        with self._cond:
            return self._retry_after_ms_locked()

    def _retry_after_ms_locked(self) -> int:
        # A slot frees when the running generation ends and the head of the queue starts; that
        # is when a retry can be accepted. With nothing running (a burst arrived between two
        # jobs) the head of the queue is about to start: count its work instead.
        if self._running is not None:
            return estimate_wait_ms(self._running_tokens_left, self.decode_tps, self.prefill_ms, 1)
        head = next((q[0] for q in self._queues.values() if q), None)
        tokens = head.max_tokens if head is not None else 0
        return estimate_wait_ms(tokens, self.decode_tps, self.prefill_ms, 1)
