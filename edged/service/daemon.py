"""The daemon: broker -> validate -> schedule -> infer -> publish, and acknowledgement last.

Threads, and what each owns:
* `mqtt-network` (the transport): parses and validates every inbound message, answers errors,
  dedupes redeliveries and submits queries. It never waits for inference.
* `edged-worker`: runs one generation at a time, publishes its final reply, then hands the
  query's acknowledgement to the transport, which sends it once the broker has the reply.
* `edged-status`: refreshes the retained node status and purges the answered-query store.

Delivery (API.md): a query is acknowledged only after its final reply is stored, published
and acknowledged by the broker. So a crash at any point means redelivery; a redelivered query
that was answered gets the stored reply again, byte-identical, and one that is still queued or
running is answered once, for every delivery.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from edged import __version__
from edged.clinical.advice import (
    degraded_text,
    escalation,
    triage_payload,
    user_message,
    vitals_context,
)
from edged.clinical.alerts import AlertGate, alert_payload
from edged.clinical.state import VitalsState
from edged.clinical.triage import Triage as ClinicalTriage
from edged.clinical.triage import assess
from edged.config.layers import detect_board
from edged.config.models import EdgedConfig
from edged.engine import (
    ContextFullError,
    Engine,
    EngineOptions,
    GenerationConfig,
    GenerationResult,
    ModelDirError,
)
from edged.governor.memory_check import check_model_fits
from edged.governor.policy import (
    GovernorDecision,
    GovernorInput,
    GovernorPolicy,
    GovernorState,
    ThermalBands,
    decide,
    pause_after_step,
    preferred_cores,
)
from edged.governor.sensors import Readings, read_all, read_core_capacities
from edged.mqtt.answer_store import AnswerStore
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.messages import (
    Query,
    Vitals,
    decode_payload,
    parse_cancel,
    parse_query,
    parse_vitals,
)
from edged.mqtt.payloads import advice_payload, encode, status_payload
from edged.mqtt.streaming import ChunkStreamer
from edged.mqtt.topics import Topics
from edged.mqtt.transport import AckToken, InboundMessage, MqttTransport
from edged.scheduler import Job, QueueFull, Scheduler

log = logging.getLogger(__name__)

_SHUTDOWN = "shutdown"
_PURGE_EVERY_S = 3600.0


class NodeState(str, enum.Enum):
    STARTING = "starting"
    ONLINE = "online"
    DEGRADED = "degraded"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass(frozen=True)
class ReplyRoute:
    topic: str
    correlation: bytes | None


@dataclass(frozen=True)
class QueryWork:
    query: Query
    route: ReplyRoute


@dataclass
class Counters:
    received: int = 0
    vitals: int = 0
    queries: int = 0
    answered: int = 0
    errors: int = 0
    duplicates: int = 0
    alerts: int = 0
    paused_s: float = 0.0
    """Time inference rested between decode steps (the duty cycle)."""


VitalsHandler = Callable[[str, Vitals], None]


class Daemon:
    def __init__(
        self,
        config: EdgedConfig,
        engine: Engine | None = None,
        on_vitals: VitalsHandler | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix, config.node_id)
        self.engine: Engine | None = engine or self._load_engine(config)
        self.system_prompt_tokens = (
            self.engine.set_system_prompt(config.model.system_prompt) if self.engine else 0
        )
        clinical = config.clinical
        self.vitals = VitalsState(
            clinical.window_s,
            clinical.max_wearers,
            clinical.max_summaries_per_wearer,
            clinical.wearer_ttl_s,
        )
        self.alerts = AlertGate(clinical.alert_cooldown_s, clinical.max_wearers)
        state_dir = Path(config.delivery.state_dir)
        self.store = AnswerStore(state_dir / "answered.sqlite3", config.delivery.answered_ttl_s)
        self.scheduler = Scheduler(config.limits.queue_size)
        self.counters = Counters()
        self.state = NodeState.STARTING
        self._on_vitals = on_vitals
        self._started_at = time.monotonic()
        self._heartbeat = time.monotonic()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._stopped = threading.Event()
        self.transport = MqttTransport(
            config.mqtt,
            config.client_id,
            self.topics.subscriptions(),
            will=(self.topics.status(), encode({"state": NodeState.OFFLINE.value})),
            on_message=self._on_message,
            on_connected=self.publish_status,
        )
        self._worker = threading.Thread(target=self._work_loop, name="edged-worker", daemon=True)
        self._status = threading.Thread(target=self._status_loop, name="edged-status", daemon=True)
        self.readings: Readings | None = None
        self._cached_policy: GovernorPolicy | None = None
        self._governor_state: GovernorState | None = None
        self.decision = self._governor_tick(publish=False)
        self._governor = threading.Thread(
            target=self._governor_loop, name="edged-governor", daemon=True
        )

    @staticmethod
    def _load_engine(config: EdgedConfig) -> Engine | None:
        """The engine, or None when the model is disabled or cannot be loaded: the daemon then
        still serves alerts and answers queries from triage alone (`degraded`)."""
        m = config.model
        if not m.enabled:
            log.warning("model disabled by config: queries get triage-only (degraded) answers")
            return None
        try:
            # Refuse, with the numbers, a model that cannot fit, rather than being OOM-killed
            # halfway through loading it; the daemon then serves triage-only answers.
            check_model_fits(m.path, m.context_length, read_all(config.governor.sensor_root))
            capacities = read_core_capacities(config.governor.sensor_root)
            preferred = preferred_cores(m.prefer_cores, capacities)
            if preferred:
                log.info(
                    "cores in order of preference: %s (cpu_capacity %s)",
                    list(preferred),
                    [capacities.get(cpu) for cpu in preferred],
                )
            return Engine.load(
                m.path,
                EngineOptions(
                    threads=m.threads,
                    context_length=m.context_length,
                    verify_hashes=m.verify_hashes,
                    spin=m.spin_threads,
                    preferred_cores=preferred,
                ),
            )
        except ModelDirError as exc:
            log.error("model cannot be loaded, serving triage-only (degraded) answers: %s", exc)
            return None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.state = NodeState.ONLINE if self.engine else NodeState.DEGRADED
        self._worker.start()
        self._status.start()
        if self.config.governor.enabled:
            self._governor.start()
        self.transport.start()
        log.info(
            "edged %s node %s serving %s on %s:%d (prefix %s)",
            __version__,
            self.config.node_id,
            self.engine.manifest.name if self.engine else "no model (degraded)",
            self.config.mqtt.host,
            self.config.mqtt.port,
            self.config.mqtt.topic_prefix,
        )

    def stop(self) -> None:
        """Graceful stop: take no new queries (they stay queued at the broker), let the running
        generation finish within limits.drain_timeout_s or abandon it unacknowledged, publish
        `draining` then `offline`, and disconnect cleanly."""
        if self._stopping.is_set():
            self._stopped.wait(30)
            return
        self._stopping.set()
        self.state = NodeState.DRAINING
        self.publish_status()
        left = self.scheduler.drain_queued()
        if left:
            log.info("%d queued queries left unacknowledged for redelivery", len(left))
        deadline = time.monotonic() + self.config.limits.drain_timeout_s
        while self.scheduler.running is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.scheduler.running is not None:
            log.warning(
                "drain timeout: abandoning the running generation; the broker will "
                "redeliver its query"
            )
            self._abort.set()
        self.scheduler.close()
        self._worker.join(timeout=30)
        self.transport.wait_for_outbox(5.0)
        self.state = NodeState.OFFLINE
        done = threading.Event()
        self._publish(self.topics.status(), self._status_bytes(), retain=True, on_acked=done.set)
        done.wait(3.0)
        self.transport.stop()
        self.store.close()
        self._stopped.set()
        log.info("edged stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # -- live reload -----------------------------------------------------------------------

    def apply_config(self, new: EdgedConfig) -> tuple[list[str], list[str]]:
        """Apply what can change while running; return (applied keys, keys that need a
        restart). Keys needing a restart keep their running values until then."""
        old_flat, new_flat = _flatten(self.config.model_dump()), _flatten(new.model_dump())
        changed = sorted(
            k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k)
        )
        restart = [k for k in changed if k.startswith(RESTART_KEYS)]
        live = [k for k in changed if k not in restart]
        if not live:
            return live, restart
        data = new.model_dump()
        for key in restart:
            _assign(data, key, old_flat.get(key))
        effective = EdgedConfig.model_validate(data)
        old_prompt = self.config.model.system_prompt
        self.config = effective
        self._cached_policy = None
        clinical = effective.clinical
        self.vitals.window_s = clinical.window_s
        self.vitals.max_wearers = clinical.max_wearers
        self.vitals.max_per_wearer = clinical.max_summaries_per_wearer
        self.vitals.ttl_s = clinical.wearer_ttl_s
        self.alerts.cooldown_s = clinical.alert_cooldown_s
        self.alerts.max_wearers = clinical.max_wearers
        self.scheduler.capacity = effective.limits.queue_size
        logging.getLogger().setLevel(effective.log_level.upper())
        if self.engine is not None and effective.model.system_prompt != old_prompt:
            # Waits for a running generation (the engine's lock), then recomputes the cache.
            self.system_prompt_tokens = self.engine.set_system_prompt(effective.model.system_prompt)
        return live, restart

    def publish_node_error(self, message: str) -> None:
        error = ProtocolError(ErrorCode.INTERNAL, message)
        self._publish(self.topics.node_error(), encode(error.payload()))

    # -- status ----------------------------------------------------------------------------

    def _status_bytes(self) -> bytes:
        engine = self.engine
        return encode(
            status_payload(
                state=self.state.value,
                version=__version__,
                model=engine.manifest.name if engine else None,
                threads=engine.parallelism if engine else None,
                governor=self.decision.state,
                temp_c=self.readings.temp_c if self.readings else None,
                mem_available_mb=int(self._mem_available_mb()),
                queue=len(self.scheduler),
                decode_tps=self.scheduler.decode_tps if self.counters.answered else None,
                uptime_s=time.monotonic() - self._started_at,
                ts=time.time(),
            )
        )

    def _mem_available_mb(self) -> float:
        r = self.readings
        if r is not None and r.mem_headroom_mb is not None:
            return r.mem_headroom_mb
        return psutil.virtual_memory().available / 2**20

    # -- governor --------------------------------------------------------------------------

    def _policy(self) -> GovernorPolicy:
        """The governor policy, built once (board detection reads files) and again after a
        reload, since governor keys are live."""
        if self._cached_policy is None:
            self._cached_policy = self._governor_policy()
        return self._cached_policy

    def _governor_policy(self) -> GovernorPolicy:
        g = self.config.governor
        profile = detect_board(g.sensor_root) if g.profile == "auto" else g.profile
        threads = self.engine.threads if self.engine else 1
        policy = GovernorPolicy.for_profile(profile, max_threads=threads)
        # Configured bands (all three, validated as rising) replace the profile's.
        base = policy.bands
        warm, hot, critical = base.warm_c, base.hot_c, base.critical_c
        if g.warm_c is not None and g.hot_c is not None and g.critical_c is not None:
            warm, hot, critical = g.warm_c, g.hot_c, g.critical_c
        bands = ThermalBands(warm, hot, critical, g.hysteresis_c, g.dwell_s)
        return GovernorPolicy(
            bands=bands,
            max_threads=threads,
            settings=policy.settings,
            min_headroom_mb=g.min_headroom_mb,
            shrink_context_below_mb=g.shrink_context_below_mb,
            shrunk_context=g.shrunk_context,
        )

    def _governor_tick(self, publish: bool = True) -> GovernorDecision:
        """Read the sensors, decide, and log and publish a change of state."""
        g = self.config.governor
        if not g.enabled:
            readings = None
            decision, state = decide(
                None, GovernorInput(temp_c=None), self._policy(), time.monotonic()
            )
        else:
            readings = read_all(g.sensor_root)
            throttle = readings.throttle
            reading = GovernorInput(
                temp_c=readings.temp_c,
                firmware_throttling=bool(
                    throttle
                    and (throttle.throttled or throttle.freq_capped or throttle.soft_temp_limit)
                ),
                mem_headroom_mb=readings.mem_headroom_mb,
            )
            decision, state = decide(
                self._governor_state, reading, self._policy(), time.monotonic()
            )
        previous = getattr(self, "decision", None)
        self.readings, self._governor_state, self.decision = readings, state, decision
        if self.engine is not None and self.engine.parallelism != decision.threads:
            # Instant and memory-neutral: the same session, its threads narrowed to fewer cores.
            self.engine.set_parallelism(decision.threads)
        if previous is not None and (previous.state, previous.accept_queries) != (
            decision.state,
            decision.accept_queries,
        ):
            log.warning(
                "governor: %s -> %s (%s)%s",
                previous.state,
                decision.state,
                decision.reason,
                ""
                if decision.accept_queries
                else "; refusing new queries: memory headroom too low",
            )
            if publish and self.transport.connected:
                self.publish_status()
        return decision

    def _memory_busy(self, message: str, query_id: str) -> ProtocolError:
        """`busy` for lack of memory: worth a retry after the governor's next two readings."""
        return ProtocolError(
            ErrorCode.BUSY,
            message,
            id=query_id,
            retry_after_ms=int(self.config.governor.interval_s * 2000),
        )

    def _governor_loop(self) -> None:
        while not self._stopping.wait(self.config.governor.interval_s):
            try:
                self._governor_tick()
            except Exception:
                log.exception("governor tick failed")

    def publish_status(self) -> None:
        self._publish(self.topics.status(), self._status_bytes(), retain=True)

    def _status_loop(self) -> None:
        last_purge = time.monotonic()
        while not self._stopping.wait(self.config.status.interval_s):
            if self.transport.connected:
                self.publish_status()
            if time.monotonic() - last_purge > _PURGE_EVERY_S:
                self.store.purge()
                last_purge = time.monotonic()

    # -- inbound (network thread) ----------------------------------------------------------

    def _publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        on_acked: Callable[[], None] | None = None,
    ) -> None:
        self.transport.publish(
            topic, payload, qos=qos, retain=retain, correlation_data=correlation, on_acked=on_acked
        )

    def _ack_after(self, acks: list[AckToken]) -> Callable[[], None]:
        def ack_all() -> None:
            for token in acks:
                self.transport.ack(token)

        return ack_all

    def _send_error(
        self, topic: str, error: ProtocolError, correlation: bytes | None, acks: list[AckToken]
    ) -> None:
        self.counters.errors += 1
        log.info("error %s on %s (field %s)", error.code.value, topic, error.field)
        self._publish(
            topic, encode(error.payload()), correlation=correlation, on_acked=self._ack_after(acks)
        )

    def _on_message(self, msg: InboundMessage) -> None:
        self.counters.received += 1
        try:
            inbound = self.topics.parse(msg.topic)
        except ProtocolError as err:
            self._send_error(self.topics.node_error(), err, msg.correlation_data, [msg.ack])
            return
        if inbound.kind == "vitals":
            self._on_vitals_message(inbound.wearer, msg)
        elif inbound.kind == "cancel":
            self._on_cancel_message(inbound.wearer, msg)
        else:
            self._on_query_message(inbound.wearer, msg)

    def _on_vitals_message(self, wearer: str, msg: InboundMessage) -> None:
        try:
            vitals = parse_vitals(decode_payload(msg.payload, self.config.limits.max_message_bytes))
        except ProtocolError as err:
            self._send_error(self.topics.error(wearer), err, msg.correlation_data, [msg.ack])
            return
        self.counters.vitals += 1
        now = time.time()
        # The deterministic path: scored here, on the network thread, the moment the summary
        # arrives; it never waits for the model, which runs on the worker.
        triage = assess(self.vitals.add(wearer, vitals, now), self.config.clinical.red_flags)
        if self.alerts.check(wearer, triage, now):
            self.counters.alerts += 1
            log.info("alert for %s: severity %s", wearer, triage.severity)
            # The alert carries the summary's own time: when the condition was measured.
            self._publish(
                self.topics.alert(wearer), encode(alert_payload(wearer, vitals.ts, triage))
            )
        if self._on_vitals is not None:
            self._on_vitals(wearer, vitals)
        self.transport.ack(msg.ack)

    def _on_cancel_message(self, wearer: str, msg: InboundMessage) -> None:
        try:
            cancel = parse_cancel(decode_payload(msg.payload, self.config.limits.max_message_bytes))
        except ProtocolError as err:
            self._send_error(self.topics.error(wearer), err, msg.correlation_data, [msg.ack])
            return
        job = self.scheduler.cancel((wearer, cancel.id))
        if job is not None:
            # Cancelled before generation started: the query's final reply is the error.
            self._final_error(
                job,
                ProtocolError(
                    ErrorCode.CANCELLED, "cancelled before generation started", id=job.query_id
                ),
            )
        # A cancel for an unknown, running or finished id needs no reply (API.md).
        self.transport.ack(msg.ack)

    def _reply_route(
        self, wearer: str, msg: InboundMessage, obj: dict[str, Any] | None
    ) -> ReplyRoute:
        """Where this query's replies go; raises ProtocolError(forbidden_reply_topic)."""
        requested = msg.response_topic
        if requested is None and obj is not None and isinstance(obj.get("reply_to"), str):
            requested = obj["reply_to"]
        if requested is None:
            return ReplyRoute(self.topics.advice(wearer), msg.correlation_data)
        if not self.topics.reply_allowed(
            wearer, requested, self.config.mqtt.allow_foreign_reply_topics
        ):
            shown = requested if len(requested) <= 80 else requested[:77] + "..."
            raise ProtocolError(
                ErrorCode.FORBIDDEN_REPLY_TOPIC,
                f"reply topic {shown!r} is outside {self.topics.prefix}/v1/{wearer}/",
                field="reply_to" if msg.response_topic is None else None,
            )
        return ReplyRoute(requested, msg.correlation_data)

    def _on_query_message(self, wearer: str, msg: InboundMessage) -> None:
        limits = self.config.limits
        error_topic = self.topics.error(wearer)
        obj: dict[str, Any] | None = None
        try:
            obj = decode_payload(msg.payload, limits.max_message_bytes)
        except ProtocolError as err:
            # Without JSON only an MQTT 5 Response Topic can tell where the reply goes.
            topic = error_topic
            if msg.response_topic is not None:
                with contextlib.suppress(ProtocolError):
                    topic = self._reply_route(wearer, msg, None).topic
            self._send_error(topic, err, msg.correlation_data, [msg.ack])
            return
        query_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        try:
            route = self._reply_route(wearer, msg, obj)
        except ProtocolError as err:
            self._send_error(
                error_topic, err.with_id(_safe_id(query_id)), msg.correlation_data, [msg.ack]
            )
            return
        try:
            query = parse_query(
                obj,
                max_tokens_cap=limits.max_tokens_cap,
                default_max_tokens=limits.default_max_tokens,
                max_text_chars=limits.max_query_chars,
            )
        except ProtocolError as err:
            self._send_error(route.topic, err, route.correlation, [msg.ack])
            return
        self.counters.queries += 1
        key = (wearer, query.id)
        with self._lock:
            running = self.scheduler.find(key)
            if running is not None:
                # A redelivery of a query still in progress: answer once, ack every copy.
                running.acks.append(msg.ack)
                self.counters.duplicates += 1
                return
        stored = self.store.get(wearer, query.id)
        if stored is not None:
            self.counters.duplicates += 1
            log.info(
                "query %s/%s was answered already: re-sending the stored reply", wearer, query.id
            )
            self._publish(
                stored.topic,
                stored.payload,
                correlation=stored.correlation,
                on_acked=self._ack_after([msg.ack]),
            )
            return
        if self._stopping.is_set():
            return  # left unacknowledged: the broker redelivers it to the next start
        now = time.monotonic()
        job = Job(
            wearer=wearer,
            query_id=query.id,
            priority=query.priority,
            max_tokens=query.max_tokens,
            received_at=now,
            deadline_at=now + query.deadline_s if query.deadline_s is not None else None,
            payload=QueryWork(query, route),
            acks=[msg.ack],
        )
        if not self.decision.accept_queries:
            self._send_error(
                route.topic,
                self._memory_busy(
                    "memory headroom is too low to take queries right now; retry later", query.id
                ),
                route.correlation,
                [msg.ack],
            )
            return
        try:
            self.scheduler.submit(job)
        except QueueFull as full:
            self._send_error(
                route.topic,
                ProtocolError(
                    ErrorCode.BUSY,
                    f"queue is full ({self.scheduler.capacity} queries waiting); retry later",
                    id=query.id,
                    retry_after_ms=full.retry_after_ms,
                ),
                route.correlation,
                [msg.ack],
            )
            return
        log.info(
            "query %s/%s queued (%s, max_tokens %d, queue %d)",
            wearer,
            query.id,
            query.priority,
            query.max_tokens,
            len(self.scheduler),
        )

    # -- the worker ------------------------------------------------------------------------

    def _final_reply(
        self,
        job: Job,
        payload: bytes,
        decode_tps: float | None = None,
        prefill_ms: float | None = None,
    ) -> None:
        """Store, publish, and acknowledge every delivery of `job` once the broker has it.

        The store is written before the job leaves the scheduler, so a redelivery arriving in
        between finds one or the other, never neither."""
        work: QueryWork = job.payload
        self.store.put(job.wearer, job.query_id, work.route.topic, payload, work.route.correlation)
        with self._lock:
            self.scheduler.finish(job, decode_tps=decode_tps, prefill_ms=prefill_ms)
            acks = list(job.acks)
        self.counters.answered += 1
        self._publish(
            work.route.topic,
            payload,
            correlation=work.route.correlation,
            on_acked=self._ack_after(acks),
        )

    def _final_error(self, job: Job, error: ProtocolError) -> None:
        self.counters.errors += 1
        log.info("query %s/%s ends with %s", job.wearer, job.query_id, error.code.value)
        self._final_reply(job, encode(error.payload()))

    def _expire_queued(self) -> None:
        for job in self.scheduler.take_expired():
            self._final_error(
                job,
                ProtocolError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    "deadline passed before generation started",
                    id=job.query_id,
                ),
            )

    def healthy(self) -> tuple[bool, str]:
        """Whether the daemon is doing its job, for the systemd watchdog: the network thread
        alive, the worker thread alive and not stuck inside one decode step (or one idle
        wait) for longer than service.stall_timeout_s. A broker that is down is *not*
        unhealthy: restarting the daemon would not bring it back, and reconnecting is running."""
        if not self.transport.alive:
            return False, "MQTT network thread died"
        if not self._worker.is_alive():
            return False, "inference worker died"
        stalled = time.monotonic() - self._heartbeat
        if stalled > self.config.service.stall_timeout_s:
            return False, f"inference worker stalled for {stalled:.0f} s"
        return True, "ok"

    def _work_loop(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            job = self.scheduler.next_job(timeout=0.2)
            self._expire_queued()
            if job is None:
                if self._stopping.is_set() and self.scheduler.running is None:
                    return
                continue
            try:
                self._run_job(job)
            except Exception:
                log.exception("query %s/%s failed", job.wearer, job.query_id)
                self._final_error(
                    job,
                    ProtocolError(
                        ErrorCode.INTERNAL,
                        "internal error while generating; see the node's log",
                        id=job.query_id,
                    ),
                )

    def _run_job(self, job: Job) -> None:
        work: QueryWork = job.payload
        query = work.query
        started = time.monotonic()
        if job.expired(started):
            self._final_error(
                job,
                ProtocolError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    "deadline passed before generation started",
                    id=job.query_id,
                ),
            )
            return
        clinical = self.config.clinical
        window = self.vitals.window(job.wearer, time.time())
        triage = assess(window, clinical.red_flags)
        if self.engine is None or not self.decision.model_available:
            # No model, or the governor paused it (critical temperature): triage alone.
            self._answer(job, started, triage, degraded_text(triage), "degraded", None)
            return
        engine = self.engine
        context = None
        if query.include_vitals:
            context = vitals_context(
                window,
                triage,
                clinical.window_s,
                lambda text: len(engine.tokenizer.encode(text)),
                clinical.vitals_prompt_tokens,
            )
        m = self.config.model
        config = GenerationConfig(
            # A hot board answers shorter (the governor's cap), never longer than asked.
            max_new_tokens=min(query.max_tokens, self.decision.max_new_tokens or query.max_tokens),
            temperature=m.temperature,
            top_k=m.top_k,
            top_p=m.top_p,
            repetition_penalty=m.repetition_penalty,
            reasoning_budget=m.reasoning_budget,
            # Tight memory: a shorter context keeps a growing KV cache small.
            max_context=self.decision.context_cap,
        )
        streamer = None
        if query.stream:
            stream_topic = Topics.stream(work.route.topic)
            streamer = ChunkStreamer(
                query.id,
                lambda data: self._publish(
                    stream_topic, data, qos=0, correlation=work.route.correlation
                ),
                self.config.streaming.interval_ms,
                self.config.streaming.max_tokens,
            )

        def stop_check() -> str | None:
            if self._abort.is_set():
                return _SHUTDOWN
            if job.cancelled:
                return "cancelled"
            if job.expired(time.monotonic()):
                return "deadline"
            return None

        step_started: float | None = None  # None until the first decode step (after prefill)

        def between_steps(step: int) -> None:
            nonlocal step_started
            now = self._heartbeat = time.monotonic()
            self.scheduler.progress(query.max_tokens - step)
            self._expire_queued()
            # The duty cycle: rest in proportion to the step just taken (the governor's idle
            # fraction), and never less than the configured floor.
            step_s = 0.0 if step_started is None else now - step_started
            pause = pause_after_step(
                step_s, self.decision.idle_fraction, self.config.governor.pause_ms / 1000.0
            )
            if pause:
                time.sleep(pause)
                self.counters.paused_s += pause
            step_started = time.monotonic()

        messages = [
            {"role": "system", "content": m.system_prompt},
            {"role": "user", "content": user_message(query.text, context)},
        ]
        try:
            result = engine.chat(
                messages,
                config,
                enable_thinking=m.enable_thinking,
                on_text=streamer.push if streamer else None,
                stop_check=stop_check,
                between_steps=between_steps,
            )
        except ContextFullError as exc:
            if exc.capped:
                # Only the governor's memory cap is in the way, and nothing was generated: like a
                # full queue, `busy` is not stored as the query's answer, so a retry of the same
                # id is served once memory allows.
                with self._lock:
                    self.scheduler.finish(job)
                    acks = list(job.acks)
                self._send_error(
                    work.route.topic,
                    self._memory_busy(f"{exc} while memory is tight; retry later", job.query_id),
                    work.route.correlation,
                    acks,
                )
                return
            self._final_error(
                job, ProtocolError(ErrorCode.TOO_LARGE, str(exc), field="text", id=job.query_id)
            )
            return
        if result.finish_reason == _SHUTDOWN:
            with self._lock:
                self.scheduler.finish(job)
            return  # unacknowledged on purpose: redelivered and answered after the restart
        if result.completion_tokens == 0 and result.finish_reason in ("cancelled", "deadline"):
            code = (
                ErrorCode.CANCELLED
                if result.finish_reason == "cancelled"
                else ErrorCode.DEADLINE_EXCEEDED
            )
            self._final_error(
                job, ProtocolError(code, f"{code.value} before generation started", id=job.query_id)
            )
            return
        if streamer is not None:
            streamer.flush()
        self._answer(job, started, triage, result.text, result.finish_reason, result)

    def _answer(
        self,
        job: Job,
        started: float,
        triage: ClinicalTriage,
        text: str,
        finish_reason: str,
        result: GenerationResult | None,
    ) -> None:
        """Build the advice (the guard: triage and escalation whatever the model wrote),
        store, publish and acknowledge it."""
        work: QueryWork = job.payload
        engine = self.engine
        t = result.timing if result is not None else None
        queued_ms = (started - job.received_at) * 1000
        payload = encode(
            advice_payload(
                query_id=work.query.id,
                wearer=job.wearer,
                node=self.config.node_id,
                text=text,
                escalation=escalation(triage, self.config.clinical),
                triage=triage_payload(triage),
                finish_reason=finish_reason,
                model_name=engine.manifest.name if engine else None,
                model_quant=engine.manifest.quantization.method if engine else None,
                prompt_tokens=result.prompt_tokens if result else None,
                completion_tokens=result.completion_tokens if result else None,
                queued_ms=queued_ms,
                first_token_ms=queued_ms + t.first_token_ms
                if t is not None and t.first_token_ms is not None
                else None,
                total_ms=(time.monotonic() - job.received_at) * 1000,
                threads=engine.parallelism if engine else None,
                governor_state=self.decision.state,
                disclaimer=self.config.clinical.disclaimer,
            )
        )
        self._final_reply(
            job,
            payload,
            decode_tps=t.decode_tps if t else None,
            prefill_ms=t.prefill_ms if t else None,
        )
        log.info(
            "query %s/%s answered: %s, %d tokens",
            job.wearer,
            job.query_id,
            finish_reason,
            result.completion_tokens if result else 0,
        )


# Keys that only take effect on a restart: they shape connections, threads or files opened at
# start. Everything else (clinical thresholds, limits, prompts, streaming, logging) is live.
RESTART_KEYS = (
    "node_id",
    "mqtt.",
    "model.path",
    "model.threads",
    "model.context_length",
    "model.verify_hashes",
    "model.spin_threads",
    "model.enabled",
    "delivery.",
    "service.",
    "status.",
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def _safe_id(value: str | None) -> str | None:
    import re

    return value if value is not None and re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", value) else None
