"""The one owner of delivery: queries in flight, the answered store, acknowledgements, expiry.

Everything that decides whether a query is new, a redelivery or answered already, and every
durable write, happens on one thread (`edged-delivery`), fed by a queue: accepted queries and
cancels from the network thread, final replies from the worker. Nothing else touches the
in-flight registry or the store, so no lock spans them and neither the network thread nor the
decode loop ever waits for an fsync.

Delivery (API.md): a query is acknowledged only after its final reply is stored, published and
acknowledged by the broker. A redelivery of a query in flight is answered once for every copy;
one of a query answered already gets the stored reply again, byte-identical. Every queued query
is also kept in the store until its reply replaces it, and a start resumes those left: a broker
that crashed may have forgotten them (edged.service.inbox).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edged.config.models import EdgedConfig
from edged.domain import Query
from edged.governor.policy import GovernorDecision
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.payloads import encode
from edged.mqtt.routing import ReplyRoute
from edged.mqtt.transport import AckToken
from edged.scheduler import Job, QueueFull, Scheduler, SchedulerClosed
from edged.service.answer_store import AnswerStore
from edged.service.inbox import decode_work, encode_work
from edged.service.metrics import Counters
from edged.service.outbox import Outbox
from edged.service.outcomes import Abandoned, Accept, CancelQuery, FinalReply, Publish, QueryWork

log = logging.getLogger(__name__)

_TICK_S = 0.05
"""How often queued deadlines are checked when nothing else happens."""
_RETRY_STORE_S = 5.0
"""How often a reply the store refused is tried again."""
_PURGE_EVERY_S = 3600.0


@dataclass
class InFlight:
    job: Job
    acks: list[AckToken] = field(default_factory=list)
    """One per delivery of the query: all are acknowledged with its final reply."""


@dataclass(frozen=True)
class _Forget:
    jobs: tuple[Job, ...]


Command = Accept | CancelQuery | FinalReply | Abandoned | _Forget | None


def memory_busy(message: str, query_id: str, interval_s: float) -> ProtocolError:
    """`busy` for lack of memory: worth a retry after the governor's next two readings."""
    return ProtocolError(
        ErrorCode.BUSY, message, id=query_id, retry_after_ms=int(interval_s * 2000)
    )


def deadline_error(job: Job) -> ProtocolError:
    return ProtocolError(
        ErrorCode.DEADLINE_EXCEEDED, "deadline passed before generation started", id=job.query_id
    )


def admission(decision: GovernorDecision, query_id: str, interval_s: float) -> ProtocolError | None:
    """Why a new query cannot be taken now, or None."""
    if not decision.accept_queries:
        return memory_busy(
            "memory headroom is too low to take queries right now; retry later",
            query_id,
            interval_s,
        )
    return None


class Delivery:
    def __init__(
        self,
        store: AnswerStore,
        scheduler: Scheduler,
        outbox: Outbox,
        counters: Counters,
        config: Callable[[], EdgedConfig],
        decision: Callable[[], GovernorDecision],
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._outbox = outbox
        self._counters = counters
        self._config = config
        self._decision = decision
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._inflight: dict[tuple[str, str], InFlight] = {}
        self._accepting = threading.Event()
        self._accepting.set()
        self._last_purge = time.monotonic()
        self._unstored: dict[tuple[str, str], FinalReply] = {}
        """Final replies the store refused, by job key: unsent until stored."""
        self._last_store_retry = 0.0
        self._thread = threading.Thread(target=self._run, name="edged-delivery", daemon=True)

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def holding(self) -> bool:
        """Whether final replies wait unsent for the store to take them (a full disk)."""
        return bool(self._unstored)

    def submit(self, command: Accept | CancelQuery | FinalReply | Abandoned) -> None:
        self._inbox.put(command)

    def stop_accepting(self) -> None:
        """Shutdown: queries not yet queued stay unacknowledged at the broker, and so do the
        queued ones, which are taken back from the scheduler (the running one finishes)."""
        self._accepting.clear()
        self._inbox.put(_Forget(tuple(self._scheduler.drain_queued())))

    def close(self, timeout: float) -> None:
        """Carry out what is queued (the last final reply), then end the thread."""
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- the delivery thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._resume_pending()
        except Exception:
            log.exception("resuming the queries kept in the answered store failed")
        while True:
            try:
                command = self._inbox.get(timeout=_TICK_S)
            except queue.Empty:
                command = _Forget(())
            if command is None:
                return
            try:
                self._carry_out(command)
                self._expire_queued()
                self._retry_unstored()
                self._purge_now_and_then()
            except Exception:
                # A bug here must not stop delivery of everything else; the message concerned
                # stays unacknowledged and is redelivered on the next connection.
                log.exception("delivery failed on %s", type(command).__name__)

    def _carry_out(self, command: Command) -> None:
        if isinstance(command, Accept):
            self._accept(command)
        elif isinstance(command, CancelQuery):
            self._cancel(command)
        elif isinstance(command, FinalReply):
            self._final(command)
        elif isinstance(command, Abandoned):
            self._inflight.pop(command.job.key, None)  # unacknowledged on purpose
        elif isinstance(command, _Forget):
            for job in command.jobs:
                self._inflight.pop(job.key, None)

    def _accept(self, a: Accept) -> None:
        key = (a.wearer, a.query.id)
        running = self._inflight.get(key)
        if running is not None:
            running.acks.append(a.ack)  # a redelivery of a query in progress: answer once
            self._counters.add("duplicates")
            log.debug(
                "query %s/%s redelivered in flight (mid %d, connection %d): %d deliveries",
                *key,
                a.ack.mid,
                a.ack.connection,
                len(running.acks),
            )
            return
        stored = self._store.get(a.wearer, a.query.id)
        if stored is not None:
            self._counters.add("duplicates")
            log.info("query %s/%s was answered already: re-sending the stored reply", *key)
            self._outbox.send(
                Publish(
                    stored.topic, stored.payload, correlation=stored.correlation, ack_after=(a.ack,)
                )
            )
            return
        if not self._accepting.is_set():
            return  # left unacknowledged: the broker redelivers it to the next start
        job = self._queue(a.wearer, a.query, a.route, a.received_at, [a.ack])
        if job is None:
            return
        log.debug("query %s/%s is mid %d on connection %d", *key, a.ack.mid, a.ack.connection)
        self._keep(job)

    def _queue(
        self, wearer: str, q: Query, route: ReplyRoute, received_at: float, acks: list[AckToken]
    ) -> Job | None:
        """Queue the query, or answer `busy` (not stored: a retry is served) and return None."""
        cfg = self._config()
        refusal = admission(self._decision(), q.id, cfg.governor.interval_s)
        if refusal is not None:
            self._reply_unstored(route.topic, route.correlation, refusal, acks)
            return None
        deadline = received_at + q.deadline_s if q.deadline_s is not None else None
        work = QueryWork(q, route)
        job = Job(wearer, q.id, q.priority, q.max_tokens, received_at, deadline, work=work)
        try:
            self._scheduler.submit(job)
        except QueueFull as full:
            busy = ProtocolError(
                ErrorCode.BUSY,
                f"queue is full ({full.capacity} queries waiting); retry later",
                id=q.id,
                retry_after_ms=full.retry_after_ms,
            )
            self._reply_unstored(route.topic, route.correlation, busy, acks)
            return None
        except SchedulerClosed:
            return None  # stopping: left for redelivery
        self._inflight[job.key] = InFlight(job, acks)
        log.info(
            "query %s/%s queued (%s, max_tokens %d, queue %d)",
            wearer,
            q.id,
            q.priority,
            q.max_tokens,
            len(self._scheduler),
        )
        return job

    def _keep(self, job: Job) -> None:
        """Keep the queued query in the store until its reply replaces it (edged.service.inbox).
        Not keeping it only loses the cover for a broker crash: the query is served all the same."""
        try:
            self._store.add_pending(job.wearer, job.query_id, encode_work(job.work))
        except sqlite3.Error as exc:
            log.warning(
                "cannot keep query %s/%s in the answered store (%s): a broker crash before it "
                "is answered would lose it",
                job.wearer,
                job.query_id,
                exc,
            )

    def _resume_pending(self) -> None:
        """Queue the queries a previous run kept and never answered. A redelivery of one by the
        broker joins it, so each is generated once; its reply goes out without one."""
        resumed = 0
        for wearer, query_id, record in self._store.pending():
            if (wearer, query_id) in self._inflight:
                continue
            if self._store.get(wearer, query_id) is not None:  # answered by a degraded run
                self._store.drop_pending(wearer, query_id)
                continue
            try:
                work = decode_work(record)
            except ValueError as exc:
                log.warning("query %s/%s kept in the store: %s; dropped", wearer, query_id, exc)
                self._store.drop_pending(wearer, query_id)
                continue
            job = self._queue(wearer, work.query, work.route, time.monotonic(), [])
            if job is None:
                # Answered `busy` (the client retries): nothing left to resume. Not queued
                # because the daemon is stopping: kept for the next start.
                if self._accepting.is_set():
                    self._store.drop_pending(wearer, query_id)
                continue
            resumed += 1
        if resumed:
            log.info("resumed %d queries accepted before the restart and not answered yet", resumed)

    def _cancel(self, c: CancelQuery) -> None:
        entry = self._inflight.get((c.wearer, c.query_id))
        if entry is not None and self._scheduler.cancel(entry.job):
            # Cancelled before generation started: the query's final reply is the error.
            log.info("query %s/%s ends with cancelled", c.wearer, c.query_id)
            error = ProtocolError(
                ErrorCode.CANCELLED, "cancelled before generation started", id=c.query_id
            )
            self._final(FinalReply(entry.job, encode(error.payload()), error.code.value))
        self._outbox.ack(c.ack)

    def _final(self, reply: FinalReply) -> None:
        """Store (fsync), then publish, then acknowledge every delivery at the broker's PUBACK.
        A reply that cannot be stored (a full or failing disk) is neither published nor
        acknowledged: it stays in flight and is stored and sent when the disk takes it
        (`_retry_unstored`), so a redelivery never meets a second, different generation. A
        restart meanwhile loses only an answer nobody has seen."""
        job = reply.job
        work: QueryWork = job.work
        if reply.store and not self._stored(job, work, reply.payload):
            self._unstored[job.key] = reply  # the in-flight entry stays: redeliveries join it
            return
        entry = self._inflight.pop(job.key, None)
        acks = tuple(entry.acks) if entry is not None else ()
        self._counters.add("answered")
        if reply.error_code is not None:
            self._counters.add("errors", label=reply.error_code)
        else:
            self._counters.add("advice", label=reply.finish_reason or "unknown")
        self._outbox.send(
            Publish(
                work.route.topic, reply.payload, correlation=work.route.correlation, ack_after=acks
            )
        )

    def _stored(self, job: Job, work: QueryWork, payload: bytes) -> bool:
        try:
            self._store.put(
                job.wearer, job.query_id, work.route.topic, payload, work.route.correlation
            )
        except sqlite3.Error as exc:
            if job.key not in self._unstored:
                log.error(
                    "cannot store the reply to %s/%s (%s): held unsent and unacknowledged, "
                    "retried every %.0f s (delivery.state_dir full or failing?)",
                    job.wearer,
                    job.query_id,
                    exc,
                    _RETRY_STORE_S,
                )
            return False
        return True

    def _retry_unstored(self) -> None:
        if not self._unstored or time.monotonic() - self._last_store_retry < _RETRY_STORE_S:
            return
        self._last_store_retry = time.monotonic()
        for key, reply in list(self._unstored.items()):
            if self._stored(reply.job, reply.job.work, reply.payload):
                log.info("stored the held reply to %s/%s: sending it", *key)
                del self._unstored[key]
                self._final(replace(reply, store=False))  # stored now: send and acknowledge

    def _reply_unstored(
        self, topic: str, correlation: bytes | None, error: ProtocolError, acks: list[AckToken]
    ) -> None:
        """An error that is not the query's answer (`busy`): a retry of the same id is served."""
        self._counters.add("errors", label=error.code.value)
        log.info("query %s ends with %s (not stored)", error.id, error.code.value)
        self._outbox.send(
            Publish(topic, encode(error.payload()), correlation=correlation, ack_after=tuple(acks))
        )

    def _expire_queued(self) -> None:
        for job in self._scheduler.take_expired():
            log.info("query %s/%s ends with deadline_exceeded", job.wearer, job.query_id)
            error = deadline_error(job)
            self._final(FinalReply(job, encode(error.payload()), error.code.value))

    def _purge_now_and_then(self) -> None:
        if time.monotonic() - self._last_purge > _PURGE_EVERY_S:
            self._store.purge()
            self._last_purge = time.monotonic()
