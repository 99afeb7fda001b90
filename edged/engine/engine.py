"""`Engine`: one loaded edged model directory, ready to answer.

Loading checks the manifest hashes, opens one onnxruntime session with options chosen for small
CPUs, reads the graph layout by name and preallocates the KV cache for `context_length` tokens.
One generation runs at a time (a lock enforces it); the board has too few cores for two.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.engine import prepacked
from edged.engine.backend import BackendInfo
from edged.engine.draft import AnswerWindow, DraftSettings, NgramCounts, phrase_counts
from edged.engine.generate import (
    GenerationConfig,
    GenerationResult,
    PrefixEntry,
    Speculation,
    StepHook,
    StopCheck,
    TextCallback,
    prefill,
    run_generation,
)
from edged.engine.graph import GraphLayout, inspect_graph
from edged.engine.manifest import ModelDirError, ModelManifest, load_manifest
from edged.engine.parallelism import CoreLimiter, created_threads
from edged.engine.residency import LoadPager, drop_clean_pages
from edged.engine.runner import SharedKVRunner, make_runner
from edged.engine.tokenizer import ChatTokenizer, Message

log = logging.getLogger(__name__)

BATCH_TOLERANCE = 5e-2
"""Largest difference between a verification pass's logits and one-at-a-time logits, relative
to the largest logit, that speculation works with. float32 reassociation gives 1e-7 to 1e-5;
onnxruntime's int8-activation kernels (MatMulNBits at accuracy level 4) give some rows 1e-3 to
2e-2 (measured: x86 with AVX-512 and with AVX2, the demo model and the Qwen3-1.7B shape). Beyond
this the kernels compute something else in a batch, and speculation is off."""
PROBE_TOKENS = 32
"""Rows the load-time probe compares, batch against one at a time: rows differ by more than
reassociation only here and there (measured: 4 rows of 16 at 1e-3, the rest at 1e-7), so the
probe is a whole answer, not a draft's worth (at Qwen3-1.7B on 2 x86 cores, 2 s of load)."""
_PROBE_QUESTION = (
    "The wearer's readings over the last 30 min (3 summaries):\n- SpO2: 91 % now, lowest 89 %\n"
    "- heart rate: 104 /min now, range 98-112 /min\n- temperature: 38.2 °C\n"
    "Early-warning score: NEWS2 5, medium risk.\n\nQuestion: I feel short of breath. What "
    "should I do?"
)
_PROBE_ANSWER = (
    "Your readings show SpO2: 91 % now, lowest 89 %, lower than it should be; heart rate: 104 "
    "/min, higher than usual. Sit upright, rest and contact your care team now."
)
"""A grounded question and answer, as the daemon asks them: the probe's rows see activations
like a real answer's (a short or synthetic prompt missed a difference that this one finds)."""


def usable_cores() -> int:
    """Cores this process may run on (affinity and cpusets, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineOptions:
    threads: int = 0
    """Intra-op threads; 0 = every usable core."""
    context_length: int = 2048
    """KV cache capacity in tokens (prompt + answer); capped by the model's own context.
    The cache is preallocated, so this bounds the engine's memory."""
    prefill_chunk: int = 512
    """Prompt tokens per forward pass; bounds prefill activation memory."""
    verify_hashes: bool = True
    """Refuse a model whose files do not match the manifest's sha256."""
    spin: bool | None = None
    """Let idle worker threads spin; None = only when threads use every core, since spinning
    steals the cycles other processes (the MQTT thread, the broker) need."""
    preferred_cores: tuple[int, ...] = ()
    """Cores taken first when inference is narrowed to fewer than all (big cores first on a
    big.LITTLE board); the rest follow in order."""
    prepacked_cache: Path | None = None
    """Where to keep the graph with onnxruntime's prepacked weights (edged.engine.prepacked),
    written at the first load and memory-mapped at the next; None = repack on the heap at every
    load, as onnxruntime does by default."""
    speculation: DraftSettings | None = DraftSettings()
    """Speculative decoding by prompt lookup (edged.engine.draft) for greedy generations, on
    graphs that can return logits for several positions (the stream exporter's
    `logits_to_keep`); None = off. The tokens are the same either way."""

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads = {self.threads} must be >= 0 (0 = all cores)")
        if self.context_length < 16:
            raise ValueError(f"context_length = {self.context_length} must be >= 16")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk = {self.prefill_chunk} must be >= 1")


def session_options(threads: int, spin: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One op at a time: parallelism inside ops is all a 2-6 core board can use.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        # Spin while a step runs, not after it: an idle pool otherwise spins on for about 50 ms
        # of a core after every generation, and between steps it takes the CPU the MQTT thread
        # needs (alert p99 while generating, Qwen3-0.6B, 2 threads on 2 cores: 7.8-24 ms, with
        # this 6.9-8.2, spinning off 5.2-5.6; decode as fast as spinning without it).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # No memory pattern: onnxruntime would plan one block for all of a run's activations per
    # input shape, and every prompt chunk and decode position is a new shape (the attention
    # mask grows). Per-op allocations from the arena peak lower, at the same speed: Qwen3-1.7B,
    # the benchmark's sequence (prompts, cached prefix, chat), peak RSS 1,606-1,608 -> 1,589-1,592
    # MB on the default graph, 1,446-1,454 -> 1,437-1,441 on all-int4; prefill 86-89 tok/s and
    # decode alike either way (three alternating pairs each, 2026-12-08).
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    return opts


def _session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    # ORT_DISABLE_TELEMETRY (edged/__init__.py) is the full opt-out; this covers a process that
    # imported onnxruntime before edged, whose later events it still suppresses.
    ort.disable_telemetry_events()
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _open_session(
    graph: Path, manifest: ModelManifest, options: EngineOptions, threads: int, spin: bool
) -> tuple[ort.InferenceSession, set[int]]:
    """The session and its pool's threads: on the prepacked copy when there is a good one, else
    on the original graph (writing the copy on the way when a cache directory is given)."""

    def fresh() -> ort.SessionOptions:  # a session's options object is its own to change
        return session_options(threads, spin)

    cache = options.prepacked_cache
    if cache is not None:
        entry = prepacked.entry_for(cache, manifest)
        if entry.directory.exists():
            cached, pool = created_threads(
                lambda: prepacked.open_copy(entry, lambda p: _session(p, fresh()))
            )
            if cached is not None:
                log.info("graph: prepacked copy %s", entry.directory)
                return cached, pool
        if prepacked.has_room(cache, graph.parent, manifest):
            try:
                with LoadPager(weight_files(graph)):
                    return created_threads(
                        lambda: prepacked.write_copy(
                            entry, lambda o: _session(graph, o), fresh(), manifest
                        )
                    )
            except Exception as exc:  # noqa: BLE001 - a full or read-only disk, or onnxruntime
                # failing to save, costs the cache, not the start: the original graph loads
                # below, and a graph that cannot load at all fails there with its own error.
                log.warning("prepacked cache: cannot write under %s: %s", cache, exc)
    # The pager's thread starts before created_threads lists the threads there are, so it is
    # never taken for one of the pool's.
    with LoadPager(weight_files(graph)):
        return created_threads(lambda: _session(graph, fresh()))


def weight_files(graph: Path) -> list[Path]:
    """The graph's external data files (`model.onnx.data`, or split ones)."""
    return sorted(graph.parent.glob(f"{graph.name}.data*"))


class Engine:
    def __init__(
        self,
        model_dir: Path,
        manifest: ModelManifest,
        tokenizer: ChatTokenizer,
        session: ort.InferenceSession,
        layout: GraphLayout,
        options: EngineOptions,
        threads: int,
    ) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.session = session
        self.layout = layout
        self.options = options
        self.threads = threads
        self.context_length = min(options.context_length, manifest.context_length)
        self._runner = make_runner(session, layout, self.context_length)
        self._lock = threading.Lock()
        self._prefix: PrefixEntry | None = None
        self.speculation_checked: float | None = None
        """The probe's largest logit difference, batch against one at a time, relative (None:
        not checked, no speculation on this graph); above BATCH_TOLERANCE speculation is off."""
        self._phrases: tuple[tuple[str, ...], NgramCounts] | None = None
        """The latest generation's draft phrases, counted (the configured ones: the same for
        every query until a reload changes them)."""
        self._recent = AnswerWindow(options.speculation or DraftSettings(recent_answers=0))
        self.cores = CoreLimiter(set(), list(range(threads)))
        self.eos_ids = frozenset(manifest.eos_token_ids)
        reasoning = manifest.reasoning
        self.think_ids: tuple[int | None, int | None] = (
            (tokenizer.token_id(reasoning.start), tokenizer.token_id(reasoning.end))
            if reasoning
            else (None, None)
        )

    @classmethod
    def load(cls, model_dir: str | Path, options: EngineOptions | None = None) -> Engine:
        options = options or EngineOptions()
        model_dir = Path(model_dir)
        started = time.perf_counter()
        manifest = load_manifest(model_dir, verify=options.verify_hashes)
        tokenizer = ChatTokenizer.from_dir(model_dir)
        cores = usable_cores()
        threads = options.threads or cores
        spin = options.spin if options.spin is not None else threads >= cores
        graph = model_dir / manifest.graph_file
        try:
            session, pool = _open_session(graph, manifest, options, threads, spin)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            # The installed version is the first thing to check when a graph will not load: an
            # export from a newer toolchain uses operator attributes older runtimes reject.
            raise ModelDirError(
                f"{graph}: onnxruntime {ort.__version__} cannot load the graph: {exc}"
            ) from exc
        layout = inspect_graph(session, manifest, model_dir)
        engine = cls(model_dir, manifest, tokenizer, session, layout, options, threads)
        engine.cores = CoreLimiter.for_this_process(pool, options.preferred_cores)
        engine.speculation_checked = engine._check_speculation()
        released = sum(drop_clean_pages(f) for f in weight_files(graph))
        log.debug("released %d MB of mapped weights the graph no longer reads", released >> 10)
        log.info(
            "model %s loaded in %.2f s: %s layout, %d layers, %d threads, context %d",
            manifest.name,
            time.perf_counter() - started,
            layout.kind,
            layout.num_layers,
            threads,
            engine.context_length,
        )
        return engine

    # -- prompts ---------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Message],
        enable_thinking: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        kwargs: dict[str, Any] = {}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        # Messages reach the engine from clients (a wearer's question, a gateway's history):
        # control tokens they write must stay text.
        text = self.tokenizer.render(
            messages, add_generation_prompt=add_generation_prompt, defuse=True, **kwargs
        )
        return self.tokenizer.encode(text)

    # -- prefix cache ----------------------------------------------------------------------

    def cache_prefix(self, token_ids: Sequence[int]) -> None:
        """Compute the KV of `token_ids` once; later prompts that start with them reuse it."""
        ids = tuple(token_ids)
        if not ids:
            self.clear_prefix_cache()
            return
        with self._lock:
            # Dropped first: the runner then need not save the old prefix's KV before the new
            # one's prefill writes over it (it holds prefixes weakly).
            self._prefix = None
            runner = self._runner
            runner.reset()
            prefill(runner, ids, self.options.prefill_chunk)
            self._prefix = PrefixEntry(ids, runner.snapshot())
        log.debug("prefix cache holds %d tokens", len(ids))

    def set_system_prompt(self, text: str) -> int:
        """Cache the prompt prefix that every chat with this system message starts with.

        Returns the number of cached tokens. The template's rendering of the system turn alone
        is the prefix; a template that renders it differently in a longer conversation simply
        gets no cache hit (checked per request), never a wrong answer.
        """
        ids = self.render_chat([{"role": "system", "content": text}], add_generation_prompt=False)
        self.cache_prefix(ids)
        return len(ids)

    def clear_prefix_cache(self) -> None:
        with self._lock:
            self._prefix = None

    @property
    def cached_prefix_tokens(self) -> int:
        return len(self._prefix.token_ids) if self._prefix else 0

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig | None = None,
        *,
        on_text: TextCallback | None = None,
        stop_check: StopCheck | None = None,
        between_steps: StepHook | None = None,
    ) -> GenerationResult:
        """Generate from token ids. `on_text` gets answer deltas (never reasoning);
        `stop_check` is polled every token and returns a finish reason to stop;
        `between_steps` runs between decode steps (the governor's pause point)."""
        cores = self.cores
        config = config or GenerationConfig()

        def step(n: int) -> None:
            # The calling thread runs a share of every op: it follows the core limit too, so a
            # change made mid-generation applies from the next decode step.
            cores.pin_caller()
            if between_steps is not None:
                between_steps(n)

        with self._lock:
            cores.pin_caller()
            result = run_generation(
                self._runner,
                self.tokenizer,
                prompt_ids,
                config,
                eos_ids=self.eos_ids,
                think_ids=self.think_ids,
                prefix=self._prefix,
                prefill_chunk=self.options.prefill_chunk,
                on_text=on_text,
                stop_check=stop_check,
                between_steps=step,
                speculation=self._speculation(config.draft_phrases),
            )
            if self.options.speculation is not None:
                self._recent.add(result.token_ids)
            return result

    def forget_last_answer(self) -> None:
        """Stop drafting from the latest answer (kept among the recent answers otherwise): a
        benchmark that asks the same question twice, once without speculation, must not let
        the repeat serve as an earlier answer to draft the next question from."""
        with self._lock:
            self._recent.forget_last()

    def _check_speculation(self) -> float | None:
        """Measure how far a verification pass's rows are from one step at a time, on this
        graph and this CPU; the largest relative difference, or None when there is nothing to
        check. Beyond BATCH_TOLERANCE speculation is off, with a warning.

        Within it a drafted token is accepted on logits that may differ from plain decoding's
        by rounding, and the KV entries a verification pass writes carry that rounding into
        later steps: a greedy answer is plain decoding's except where its two best candidates
        are a rounding apart (README, "Speculative decoding")."""
        runner, settings = self._runner, self.options.speculation
        if settings is None or not isinstance(runner, SharedKVRunner) or not runner.can_verify:
            return None
        prompt = self.render_chat([{"role": "user", "content": _PROBE_QUESTION}])
        probe = self.tokenizer.encode(_PROBE_ANSWER)[:PROBE_TOKENS]
        # Any tokens probe the kernels; a context too short for the whole question keeps its end.
        room = runner.capacity - len(probe)
        if room < 1:
            return None
        prompt = prompt[-room:]
        with self._lock:
            self.cores.pin_caller()
            worst = max(runner.batch_differences(prompt, probe, self.options.prefill_chunk))
        if worst > BATCH_TOLERANCE:
            log.warning(
                "speculative decoding off: this CPU's kernels give a batch's rows logits %.3g "
                "(relative) away from one step at a time (limit %g)",
                worst,
                BATCH_TOLERANCE,
            )
            self.options = replace(self.options, speculation=None)
        return worst

    def phrase_ids(self, text: str) -> list[int]:
        """A draft phrase's token ids as an answer writes it: after a space, mid-text."""
        return list(self.tokenizer.encode(" " + text.strip()))

    def _speculation(self, phrases: Sequence[str]) -> Speculation | None:
        """Drafting for one generation: the configured phrases (tokenized and counted once)
        and the latest answers."""
        settings = self.options.speculation
        if settings is None:
            return None
        key = tuple(phrases)
        if self._phrases is None or self._phrases[0] != key:
            self._phrases = key, phrase_counts(map(self.phrase_ids, key), settings)
        return Speculation(settings, (self._phrases[1], self._recent.counts))

    def chat(
        self,
        messages: Sequence[Message],
        config: GenerationConfig | None = None,
        *,
        enable_thinking: bool | None = None,
        on_text: TextCallback | None = None,
        stop_check: StopCheck | None = None,
        between_steps: StepHook | None = None,
    ) -> GenerationResult:
        ids = self.render_chat(messages, enable_thinking=enable_thinking)
        return self.generate(
            ids, config, on_text=on_text, stop_check=stop_check, between_steps=between_steps
        )

    def logits_for(
        self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Teacher forcing, for scoring (`edged model eval`): for each continuation, the logits
        that predict each of its tokens (row i follows prompt + continuation[:i]), shape
        (len(continuation), vocab). The prompt is computed once and its KV restored for each
        continuation, so scoring five answers to one question costs one prefill."""
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        out: list[np.ndarray] = []
        with self._lock:
            self.cores.pin_caller()
            runner = self._runner
            runner.reset()
            first = np.array(prefill(runner, prompt, self.options.prefill_chunk), copy=True)
            snapshot = runner.snapshot()
            for tokens in continuations:
                if not tokens:
                    out.append(np.empty((0, first.shape[-1]), dtype=np.float32))
                    continue
                runner.restore(snapshot)
                rows = [first]
                # Runners return a view of a reused buffer: every row is copied.
                rows += [np.array(runner.forward([t]), copy=True) for t in list(tokens)[:-1]]
                out.append(np.stack(rows[: len(tokens)]))
        return out

    def set_parallelism(self, cores: int) -> None:
        """Use at most `cores` cores from now on, even mid-generation (takes effect at the next
        decode step); no reload, no second copy of the weights."""
        self.cores.set_limit(cores)

    @property
    def parallelism(self) -> int:
        return len(self.cores.cpu_set())

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.manifest.name,
            quantization=self.manifest.quantization.method,
            threads=self.threads,
            context_length=self.context_length,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def count_chat_tokens(
        self, messages: Sequence[Message], enable_thinking: bool | None = None
    ) -> int:
        return len(self.render_chat(messages, enable_thinking=enable_thinking))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "threads": self.threads,
            "context_length": self.context_length,
            "kv_cache_mb": round(self.layout.kv_bytes_per_token() * self.context_length / 2**20, 1),
            **self.layout.describe(),
        }
