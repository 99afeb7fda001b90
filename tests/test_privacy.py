"""Nothing leaves the node but MQTT to its broker: onnxruntime's own usage telemetry (1DS, in
its Linux and macOS builds since 1.29) stays off in every process that runs edged's engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edged.models import DEMO_MODEL

ENGINE = """
from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.models import DEMO_MODEL
engine = Engine.load(DEMO_MODEL, EngineOptions(threads=1, context_length=128))
engine.generate([5, 6, 7, 8], GenerationConfig(max_new_tokens=2, ignore_eos=True))
"""

BARE = """
import sys
import onnxruntime as ort
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
"""


def _files_left(script: str, home: Path) -> list[str]:
    """Run `script` in a fresh interpreter whose home and cache are `home`, with no telemetry
    setting in its environment; the files it left there."""
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    graph = str(DEMO_MODEL / "model.onnx")
    subprocess.run([sys.executable, "-c", script, graph], env=env, check=True, timeout=120)
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_the_engine_leaves_onnxruntimes_telemetry_off(tmp_path: Path) -> None:
    bare, ours = tmp_path / "bare", tmp_path / "edged"
    bare.mkdir()
    ours.mkdir()
    # The control: onnxruntime alone starts its telemetry, which keeps a device id and an
    # event queue under the cache directory before it uploads anything.
    if not any("DeveloperTools" in f for f in _files_left(BARE, bare)):
        pytest.skip("this onnxruntime build has no telemetry (a source build, or before 1.29)")
    assert _files_left(ENGINE, ours) == []
