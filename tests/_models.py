"""Test models: the committed tiny Qwen3 fixture and the builder that regenerates it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from edged import models

if TYPE_CHECKING:
    from edged.engine.runner import SharedKVRunner

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
TINY_QWEN3_INT4 = models.TINY_QWEN3_INT4
"""Committed int4 export of the tiny Qwen3 (regenerate: python tools/make_test_model.py)."""

EXPORT_DISTRIBUTIONS = ("torch", "transformers", "optimum", "onnx", "onnxruntime")


def export_deps_missing() -> str | None:
    """Why the export tests cannot run here, or None when the [export] extra is installed."""
    missing = [name for name in EXPORT_DISTRIBUTIONS if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs the [export] extra: {', '.join(missing)} not importable"
    return None


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (tools/ is not a package; its scripts import each other as
    siblings, so tools/ is put on the path as a script's own directory would be)."""
    if name in sys.modules:
        return sys.modules[name]
    tools = str(REPO_ROOT / "tools")
    if tools not in sys.path:
        sys.path.append(tools)
    path = REPO_ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def make_test_model() -> ModuleType:
    """tools/make_test_model.py as a module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_tool("make_test_model")


def heldout_agreement(model_dir: Path, checkpoint: Path, dialogues: int = 8) -> float:
    """Share of the bundled held-out answers' next tokens on which the edged model at
    `model_dir` (through the engine, as the daemon runs it) and the Hugging Face `checkpoint`
    (float32, transformers) agree, teacher-forced. In-domain text: the demo model is sure of
    its next token there, so this measures quantization, not a coin toss between near-equal
    tokens on text the model never saw."""
    import torch
    from transformers import AutoModelForCausalLM

    from edged.engine import Engine, EngineOptions
    from edged.eval.datasets import DEFAULT_FILES, load
    from edged.eval.harness import split_chat

    engine = Engine.load(model_dir, EngineOptions(threads=1))
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    agree = total = 0
    for row in load([DEFAULT_FILES[0]])[:dialogues]:
        prompt, target = split_chat(engine, row.data["messages"])
        mine = engine.logits_for(prompt, [target])[0].argmax(-1)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1 :]
        agree += int((mine == logits.argmax(-1).numpy()).sum())
        total += len(target)
    return agree / total


def demo_runner(capacity: int) -> SharedKVRunner:
    """The demo model's graph in a shared-KV runner of its own (one thread), below the engine:
    for tests of what a runner does with its buffers."""
    import onnxruntime as ort

    from edged.engine.engine import session_options
    from edged.engine.graph import inspect_graph
    from edged.engine.manifest import load_manifest
    from edged.engine.runner import SharedKVRunner, make_runner

    manifest = load_manifest(models.DEMO_MODEL)
    graph = str(models.DEMO_MODEL / manifest.graph_file)
    session = ort.InferenceSession(graph, session_options(1, False), ["CPUExecutionProvider"])
    runner = make_runner(session, inspect_graph(session, manifest, models.DEMO_MODEL), capacity)
    assert isinstance(runner, SharedKVRunner)
    return runner
