"""Changing how many cores inference uses, instantly, without a second session.

onnxruntime fixes `intra_op_num_threads` per session, and a second session with another count
holds a second prepacked copy of the weights (measured: 1.15 GB against 0.62 GB for a 0.6B
int4 model). Instead the session keeps its threads and the governor narrows the CPUs they may
run on: the intra-op pool's threads and the thread that calls `run` (which works too) are
pinned with sched_setaffinity(2) to the first N allowed cores. With spinning off, threads
sharing a core take turns, so N is the effective parallelism. The split of work across
threads does not change, so greedy decoding gives the same tokens at any N.

Linux only; elsewhere every call is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def thread_ids() -> set[int]:
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def created_threads(build: Callable[[], T]) -> tuple[T, set[int]]:
    """Run `build` and return what it returned and the threads it started (the session's
    intra-op pool: onnxruntime starts it in the session constructor)."""
    before = thread_ids()
    result = build()
    return result, thread_ids() - before


class CoreLimiter:
    def __init__(self, pool_threads: set[int], cores: Sequence[int]) -> None:
        self.pool_threads = set(pool_threads)
        self.cores = list(cores)
        """Allowed cores, preferred first (e.g. a big.LITTLE board's big cores)."""
        self.limit = len(self.cores)

    @classmethod
    def for_this_process(cls, pool_threads: set[int], preferred: Sequence[int] = ()) -> CoreLimiter:
        try:
            allowed = sorted(os.sched_getaffinity(0))
        except AttributeError:
            allowed = list(range(os.cpu_count() or 1))
        ordered = [c for c in preferred if c in allowed] + [
            c for c in allowed if c not in preferred
        ]
        return cls(pool_threads, ordered)

    def cpu_set(self) -> set[int]:
        return set(self.cores[: max(1, min(self.limit, len(self.cores)))])

    def set_limit(self, n: int) -> None:
        """Pin the pool's threads to the first `n` cores (the caller pins itself, see
        `pin_caller`)."""
        self.limit = max(1, min(n, len(self.cores)))
        cpus = self.cpu_set()
        for tid in list(self.pool_threads):
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                self.pool_threads.discard(tid)  # the session was destroyed
            except (OSError, AttributeError) as exc:
                log.debug("cannot pin thread %d: %s", tid, exc)

    def pin_caller(self) -> None:
        """Pin the calling thread (it runs a share of every parallel op) to the same cores."""
        try:
            if os.sched_getaffinity(0) != self.cpu_set():
                os.sched_setaffinity(0, self.cpu_set())
        except (OSError, AttributeError) as exc:
            log.debug("cannot pin the calling thread: %s", exc)
