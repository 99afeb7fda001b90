"""Which query runs next: a bounded priority queue with deadlines, cancellation and backpressure.

One generation runs at a time (a 4-core board has no cores to spare for two). Urgent queries go
before normal ones, first-in first-out within a priority. A full queue refuses new work with an
estimate of when to retry, computed from the decode rate actually measured on this board.

The ordering and the estimate are pure functions; `Scheduler` only adds a lock and a condition
variable so the MQTT thread can submit while the worker waits.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PRIORITIES = ("urgent", "normal")


@dataclass
class Job:
    """A query accepted for generation, and everything needed to answer and acknowledge it."""

    wearer: str
    query_id: str
    priority: str
    max_tokens: int
    received_at: float
    """time.monotonic() at receipt; deadlines count from here (API.md)."""
    deadline_at: float | None
    payload: Any
    """The parsed query and reply route; opaque to the scheduler."""
    acks: list[Any] = field(default_factory=list)
    """Inbound messages (one per delivery of this query) to acknowledge once answered."""
    cancelled: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.wearer, self.query_id)

    def expired(self, now: float) -> bool:
        return self.deadline_at is not None and now >= self.deadline_at


class QueueFull(Exception):
    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


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
    ) -> None:
        self.capacity = capacity
        self._clock = clock
        self._queues: dict[str, deque[Job]] = {p: deque() for p in PRIORITIES}
        self._by_key: dict[tuple[str, str], Job] = {}
        self._cond = threading.Condition()
        self.running: Job | None = None
        self._running_tokens_left = 0
        self.decode_tps = initial_decode_tps
        self.prefill_ms = 500.0
        self._closed = False

    # -- submitting ------------------------------------------------------------------------

    def find(self, key: tuple[str, str]) -> Job | None:
        """The queued or running job for (wearer, id), if any."""
        with self._cond:
            return self._by_key.get(key)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull with a retry estimate."""
        with self._cond:
            if len(self) >= self.capacity:
                raise QueueFull(self._retry_after_ms_locked())
            self._queues[job.priority].append(job)
            self._by_key[job.key] = job
            self._cond.notify()

    def cancel(self, key: tuple[str, str]) -> Job | None:
        """Cancel a queued or running job. A queued one is removed and returned (the caller
        answers it with `cancelled`); a running one is flagged and stops within one token."""
        with self._cond:
            job = self._by_key.get(key)
            if job is None:
                return None
            job.cancelled = True
            if job is self.running:
                return None
            self._queues[job.priority].remove(job)
            del self._by_key[key]
            return job

    # -- the worker ------------------------------------------------------------------------

    def next_job(self, timeout: float | None = None) -> Job | None:
        """Block until a job is available (or timeout / close), mark it running and return it."""
        with self._cond:
            end = None if timeout is None else self._clock() + timeout
            while not self._closed:
                for priority in PRIORITIES:
                    if self._queues[priority]:
                        job = self._queues[priority].popleft()
                        self.running = job
                        self._running_tokens_left = job.max_tokens
                        return job
                remaining = None if end is None else end - self._clock()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None

    def progress(self, tokens_left: int) -> None:
        self._running_tokens_left = max(0, tokens_left)

    def finish(
        self, job: Job, decode_tps: float | None = None, prefill_ms: float | None = None
    ) -> None:
        with self._cond:
            if self.running is job:
                self.running = None
                self._running_tokens_left = 0
            self._by_key.pop(job.key, None)
            # Exponential moving averages: adapt to throttling within a few queries.
            if decode_tps:
                self.decode_tps = 0.7 * self.decode_tps + 0.3 * decode_tps
            if prefill_ms is not None:
                self.prefill_ms = 0.7 * self.prefill_ms + 0.3 * prefill_ms
            self._cond.notify_all()

    def take_expired(self) -> list[Job]:
        """Remove and return queued jobs whose deadline passed (they get deadline_exceeded)."""
        now = self._clock()
        expired: list[Job] = []
        with self._cond:
            for queue in self._queues.values():
                for job in [j for j in queue if j.expired(now)]:
                    queue.remove(job)
                    self._by_key.pop(job.key, None)
                    expired.append(job)
        return expired

    def drain_queued(self) -> list[Job]:
        """Remove every queued (not running) job: used on shutdown, they stay unacknowledged
        at the broker and are redelivered to the next start."""
        with self._cond:
            jobs = [j for p in PRIORITIES for j in self._queues[p]]
            for queue in self._queues.values():
                queue.clear()
            for job in jobs:
                self._by_key.pop(job.key, None)
            return jobs

    def close(self) -> None:
        with self._cond:
            self._closed = True
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
        if self.running is not None:
            return estimate_wait_ms(self._running_tokens_left, self.decode_tps, self.prefill_ms, 1)
        head = next((q[0] for q in self._queues.values() if q), None)
        tokens = head.max_tokens if head is not None else 0
        return estimate_wait_ms(tokens, self.decode_tps, self.prefill_ms, 1)
