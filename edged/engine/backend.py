"""The inference-backend seam: what the daemon needs of a model runtime, and nothing more.

The onnxruntime CPU engine (`edged.engine.engine.Engine`) is the first implementation; a CUDA
or TensorRT backend for a Jetson is one more module under `edged/engine/backends/`, selected
by `model.type` in the config (`load_backend`), like Frigate's detector plugins. The daemon
talks to a backend only through this protocol: it never reaches into a tokenizer, a manifest
or a session.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edged.engine.generate import (
    GenerationConfig,
    GenerationResult,
    StepHook,
    StopCheck,
    TextCallback,
)
from edged.engine.tokenizer import Message

if TYPE_CHECKING:  # the engine itself runs without pydantic (edged ask, the benchmarks)
    from edged.config.models import ModelConfig


@dataclass(frozen=True)
class BackendInfo:
    """What replies, the status and the metrics say about the loaded model."""

    name: str
    """The model's name from its manifest."""
    quantization: str
    """`int4`, `int8`, `fp32`."""
    threads: int
    """Inference threads the backend was started with (the most it can use)."""
    context_length: int
    """Tokens of KV cache: prompt plus answer."""


class InferenceBackend(Protocol):
    @property
    def info(self) -> BackendInfo: ...

    @property
    def parallelism(self) -> int:
        """Cores inference uses now (the governor may narrow it below `info.threads`)."""
        ...

    def set_parallelism(self, cores: int) -> None:
        """Use at most `cores` cores from the next decode step on; safe while generating."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def count_chat_tokens(
        self, messages: Sequence[Message], enable_thinking: bool | None = None
    ) -> int:
        """Tokens `chat(messages, enable_thinking=…)` would prefill: the chat through the
        model's template, generation prompt included."""
        ...

    def set_system_prompt(self, text: str) -> int:
        """Cache the KV of the chat prefix that this system message renders to; the number of
        tokens cached. Waits for a running generation: call it from the inference thread."""
        ...

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
        """Generate an answer to a chat. `on_text` gets answer deltas (never reasoning),
        `stop_check` is polled every token, `between_steps` runs between decode steps."""
        ...


BACKENDS: dict[str, str] = {
    "onnxruntime-cpu": "edged.engine.backends.onnxruntime_cpu",
}
"""`model.type` -> the module whose `load(config, preferred_cores, cache_dir)` builds that
backend (`cache_dir`: a directory it may keep derived files in, such as a prepacked graph).
Imported on use, so a board only imports the runtime it runs."""


def load_backend(
    config: ModelConfig, preferred_cores: tuple[int, ...] = (), cache_dir: Path | None = None
) -> InferenceBackend:
    """The backend `config.type` names, loaded from `config.path`. Raises ModelDirError for a
    model directory it cannot run (missing files, hashes, a graph the runtime rejects)."""
    module = importlib.import_module(BACKENDS[config.type])
    backend: InferenceBackend = module.load(config, preferred_cores, cache_dir)
    return backend
