"""The inference worker: pull a job, run it, hand its final reply to the delivery owner.

One thread (`edged-worker`) owns the backend: every generation and every change of the cached
system prompt runs here, so nothing else ever waits on the model (a reload only *queues* a new
prompt). The decisions around a generation are pure functions: `generation_settings` (config
+ query + governor decision -> generation settings), `prompt_budget` (the tokens a prompt with
conversation history may take) and `advice_reply` (triage + model text -> the advice bytes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edged.clinical.advice import GuardedAdvice, degraded_text, guard, vitals_block
from edged.clinical.conversation import ConversationPrompt, conversation_messages
from edged.clinical.state import VitalsState
from edged.clinical.triage import Triage, assess
from edged.config.models import ClinicalConfig, EdgedConfig, ModelConfig
from edged.domain import FinishReason, Query, Vitals
from edged.engine import (
    ContextFullError,
    GenerationConfig,
    GenerationResult,
    InferenceBackend,
    Timing,
)
from edged.governor.policy import GovernorDecision, pause_after_step
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.payloads import advice_payload, encode
from edged.mqtt.streaming import ChunkStreamer
from edged.mqtt.topics import Topics
from edged.scheduler import Job, Scheduler
from edged.service.delivery import Delivery, deadline_error, memory_busy
from edged.service.heap import IdleTrim
from edged.service.metrics import Counters
from edged.service.outbox import Outbox
from edged.service.outcomes import Abandoned, FinalReply, Publish, QueryWork

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.2
_NOT_STARTED: dict[str, ErrorCode] = {
    # API.md: stopped before any token was generated, a query gets an error, not advice.
    FinishReason.CANCELLED: ErrorCode.CANCELLED,
    FinishReason.DEADLINE: ErrorCode.DEADLINE_EXCEEDED,
}


def generation_settings(
    model: ModelConfig, query: Query, decision: GovernorDecision, phrases: tuple[str, ...] = ()
) -> GenerationConfig:
    """The request's generation settings; `phrases`: sentences the answer may copy, drafted
    from by speculative decoding (draft_phrases)."""
    return GenerationConfig(
        # A hot board answers shorter (the governor's cap), never longer than asked.
        max_new_tokens=min(query.max_tokens, decision.max_new_tokens or query.max_tokens),
        temperature=model.temperature,
        top_k=model.top_k,
        top_p=model.top_p,
        repetition_penalty=model.repetition_penalty,
        reasoning_budget=model.reasoning_budget,
        # Tight memory: a shorter context keeps a growing KV cache small.
        max_context=decision.context_cap,
        draft_phrases=phrases,
    )


def prompt_budget(settings: GenerationConfig, context_length: int) -> int:
    """Tokens the prompt may take so that the whole answer still fits: the context (or the
    governor's memory cap on it) less the answer's max_new_tokens. Earlier turns beyond it
    are dropped rather than cutting the answer short."""
    limit = context_length
    if settings.max_context is not None:
        limit = min(limit, settings.max_context)
    return limit - settings.max_new_tokens


def conversation_prompt(
    backend: InferenceBackend,
    query: Query,
    config: EdgedConfig,
    window: Sequence[Vitals],
    triage: Triage,
    settings: GenerationConfig,
) -> ConversationPrompt:
    """The query's messages: system prompt, vitals block (with include_vitals), the history
    turns that fit `prompt_budget`, the question."""
    vitals = None
    if query.include_vitals:
        vitals = vitals_block(window, triage, config.clinical, backend.count_tokens)
    thinking = config.model.enable_thinking
    return conversation_messages(
        config.model.system_prompt,
        query.history,
        query.text,
        vitals,
        lambda messages: backend.count_chat_tokens(messages, enable_thinking=thinking),
        prompt_budget(settings, backend.info.context_length),
    )


def draft_phrases(clinical: ClinicalConfig) -> tuple[str, ...]:
    """edged's own sentences that a model trained or prompted on them writes verbatim: the
    configured escalation sentences and the disclaimer."""
    return (*clinical.escalation.values(), clinical.disclaimer)


@dataclass(frozen=True)
class AnswerContext:
    """Who answered and under what conditions: the advice's metadata."""

    node: str
    model: str | None
    quantization: str | None
    threads: int | None
    governor: str


def advice_reply(
    job: Job,
    advice: GuardedAdvice,
    finish_reason: str,
    result: GenerationResult | None,
    ctx: AnswerContext,
    started: float,
    ended: float,
    *,
    history_turns: int | None,
) -> bytes:
    """The advice payload (API.md, Advice); times are time.monotonic() values;
    `history_turns`: earlier turns the prompt held, None when no model ran."""
    timing = result.timing if result is not None else None
    queued_ms = (started - job.received_at) * 1000
    first = timing.first_token_ms if timing is not None else None
    return encode(
        advice_payload(
            query_id=job.query_id,
            wearer=job.wearer,
            node=ctx.node,
            advice=advice,
            finish_reason=finish_reason,
            model_name=ctx.model,
            model_quant=ctx.quantization,
            prompt_tokens=result.prompt_tokens if result else None,
            completion_tokens=result.completion_tokens if result else None,
            history_turns=history_turns,
            queued_ms=queued_ms,
            first_token_ms=queued_ms + first if first is not None else None,
            total_ms=(ended - job.received_at) * 1000,
            threads=ctx.threads,
            governor_state=ctx.governor,
        )
    )


def error_reply(job: Job, error: ProtocolError, store: bool = True) -> FinalReply:
    log.info("query %s/%s ends with %s", job.wearer, job.query_id, error.code.value)
    payload = encode(error.with_id(job.query_id).payload())
    return FinalReply(job, payload, error_code=error.code.value, store=store)


class Worker:
    def __init__(
        self,
        backend: InferenceBackend | None,
        scheduler: Scheduler,
        delivery: Delivery,
        outbox: Outbox,
        vitals: VitalsState,
        config: Callable[[], EdgedConfig],
        decision: Callable[[], GovernorDecision],
        counters: Counters,
    ) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._delivery = delivery
        self._outbox = outbox
        self._vitals = vitals
        self._config = config
        self._decision = decision
        self._counters = counters
        self._abort = threading.Event()
        self._stopping = threading.Event()
        self._pending_prompt: str | None = None
        self._prompt_lock = threading.Lock()
        self._timing: Timing | None = None
        self._trim = IdleTrim()
        self.heartbeat = time.monotonic()
        """Refreshed between decode steps and idle waits: the watchdog's sign of life."""
        self._thread = threading.Thread(target=self._run, name="edged-worker", daemon=True)

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def request_system_prompt(self, text: str) -> None:
        """Recompute the cached system prompt before the next job. Never waits: the thread
        that asks (a reload, on the one that feeds systemd's watchdog) must not block on a
        generation."""
        with self._prompt_lock:
            self._pending_prompt = text

    def abort(self) -> None:
        """Stop the running generation at the next token; it stays unanswered for redelivery."""
        self._abort.set()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    # -- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            self._apply_pending_prompt()
            job = self._scheduler.next_job(timeout=_IDLE_WAIT_S)
            if job is None:
                if self._stopping.is_set():
                    return
                self._trim.idle()
                continue
            self._trim.worked()
            self._timing = None
            try:
                reply = self._run_job(job)
            except Exception:
                log.exception("query %s/%s failed", job.wearer, job.query_id)
                reply = error_reply(
                    job,
                    ProtocolError(
                        ErrorCode.INTERNAL, "internal error while generating; see the node's log"
                    ),
                )
            finally:
                t = self._timing
                self._scheduler.finish(
                    job,
                    decode_tps=t.decode_tps if t is not None else None,
                    prefill_ms=t.prefill_ms if t is not None else None,
                )
            self._delivery.submit(reply)

    def _apply_pending_prompt(self) -> None:
        with self._prompt_lock:
            text, self._pending_prompt = self._pending_prompt, None
        if text is not None and self._backend is not None:
            tokens = self._backend.set_system_prompt(text)
            log.info("system prompt changed: %d tokens cached", tokens)

    def _run_job(self, job: Job) -> FinalReply | Abandoned:
        config = self._config()  # one snapshot for the whole job, whatever a reload does
        started = time.monotonic()
        if job.expired(started):
            return error_reply(job, deadline_error(job))
        window = self._vitals.window(job.wearer, time.monotonic())  # as handlers add them
        triage = assess(window, config.clinical.red_flags)
        decision = self._decision()
        if self._backend is None or not decision.model_available:
            # No model, or the governor paused it (critical temperature): triage alone.
            advice = guard(triage, degraded_text(triage), config.clinical)
            return self._answer(job, config, advice, FinishReason.DEGRADED, None, started, None)
        try:
            result, turns = self._generate(self._backend, job, config, window, triage, decision)
        except ContextFullError as exc:
            return self._context_full(job, exc, config)
        self._timing = result.timing
        self._count_work(result)
        return self._result_reply(job, config, triage, result, started, turns)

    def _count_work(self, result: GenerationResult) -> None:
        """What the model computed, for the metrics (llama.cpp's server counts the same)."""
        timing, counts = result.timing, self._counters
        counts.add("prompt_tokens", result.prompt_tokens - result.cached_tokens)
        counts.add("prompt_s", timing.prefill_ms / 1000)
        counts.add("predicted_tokens", result.completion_tokens)
        counts.add("predicted_s", max(timing.total_ms - timing.prefill_ms, 0.0) / 1000)

    def _result_reply(
        self,
        job: Job,
        config: EdgedConfig,
        triage: Triage,
        result: GenerationResult,
        started: float,
        history_turns: int,
    ) -> FinalReply | Abandoned:
        reason = result.finish_reason
        if reason == FinishReason.SHUTDOWN:
            return Abandoned(job)  # unacknowledged on purpose: answered after the restart
        if result.completion_tokens == 0 and reason in _NOT_STARTED:
            code = _NOT_STARTED[reason]
            return error_reply(job, ProtocolError(code, f"{code.value} before generation started"))
        advice = guard(triage, result.text, config.clinical)
        log.info(
            "query %s/%s answered: %s, %d tokens",
            job.wearer,
            job.query_id,
            reason,
            result.completion_tokens,
        )
        return self._answer(job, config, advice, reason, result, started, history_turns)

    def _context_full(self, job: Job, exc: ContextFullError, config: EdgedConfig) -> FinalReply:
        if exc.capped:
            # Only the governor's memory cap is in the way, and nothing was generated: like a
            # full queue, `busy` is not stored as the query's answer, so a retry of the same
            # id is served once memory allows.
            busy = memory_busy(
                f"{exc} while memory is tight; retry later",
                job.query_id,
                config.governor.interval_s,
            )
            return error_reply(job, busy, store=False)
        return error_reply(job, ProtocolError(ErrorCode.TOO_LARGE, str(exc), field="text"))

    def _answer(
        self,
        job: Job,
        config: EdgedConfig,
        advice: GuardedAdvice,
        finish_reason: str,
        result: GenerationResult | None,
        started: float,
        history_turns: int | None,
    ) -> FinalReply:
        backend = self._backend
        ctx = AnswerContext(
            node=config.node_id,
            model=backend.info.name if backend else None,
            quantization=backend.info.quantization if backend else None,
            threads=backend.parallelism if backend else None,
            governor=self._decision().state,
        )
        ended = time.monotonic()
        payload = advice_reply(
            job, advice, finish_reason, result, ctx, started, ended, history_turns=history_turns
        )
        return FinalReply(job, payload, finish_reason=finish_reason)

    # -- one generation --------------------------------------------------------------------

    def _generate(
        self,
        backend: InferenceBackend,
        job: Job,
        config: EdgedConfig,
        window: Sequence[Vitals],
        triage: Triage,
        decision: GovernorDecision,
    ) -> tuple[GenerationResult, int]:
        """The result, and how many history turns its prompt held."""
        work: QueryWork = job.work
        query = work.query
        settings = generation_settings(
            config.model, query, decision, draft_phrases(config.clinical)
        )
        prompt = conversation_prompt(backend, query, config, window, triage, settings)
        if prompt.history_turns < len(query.history):
            log.debug(
                "query %s/%s: %d of %d history turns fit the context",
                job.wearer,
                job.query_id,
                prompt.history_turns,
                len(query.history),
            )
        streamer = self._streamer(work, config) if query.stream else None
        result = backend.chat(
            prompt.messages,
            settings,
            enable_thinking=config.model.enable_thinking,
            on_text=streamer.push if streamer else None,
            stop_check=lambda: self._stop_reason(job),
            between_steps=self._pacer(job, config),
        )
        if streamer is not None and result.finish_reason != FinishReason.SHUTDOWN:
            streamer.flush()
        return result, prompt.history_turns

    def _streamer(self, work: QueryWork, config: EdgedConfig) -> ChunkStreamer:
        topic = Topics.stream(work.route.topic)
        correlation = work.route.correlation

        def send(data: bytes) -> None:
            self._outbox.send(Publish(topic, data, qos=0, correlation=correlation))

        return ChunkStreamer(
            work.query.id,
            send,
            config.streaming.interval_ms,
            config.streaming.max_tokens,
        )

    def _stop_reason(self, job: Job) -> str | None:
        if self._abort.is_set():
            return FinishReason.SHUTDOWN
        if job.cancelled:
            return FinishReason.CANCELLED
        if job.expired(time.monotonic()):
            return FinishReason.DEADLINE
        return None

    def _pacer(self, job: Job, config: EdgedConfig) -> Callable[[int], None]:
        """Between decode steps: the heartbeat, the queue's progress estimate, and the duty
        cycle — a rest in proportion to the step just taken (the governor's idle fraction,
        read afresh every step), never less than governor.pause_ms."""
        floor_s = config.governor.pause_ms / 1000.0
        step_started: float | None = None  # None until the first decode step (after prefill)

        def between_steps(step: int) -> None:
            nonlocal step_started
            now = self.heartbeat = time.monotonic()
            self._scheduler.progress(job.max_tokens - step)
            step_s = 0.0 if step_started is None else now - step_started
            pause = pause_after_step(step_s, self._decision().idle_fraction, floor_s)
            if pause:
                time.sleep(pause)
                self._counters.add("paused_s", pause)
            step_started = time.monotonic()

        return between_steps
