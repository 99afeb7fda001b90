"""ONNX causal-LM engine: load an edged model directory and generate from it.

`backend` is the seam the daemon uses (`InferenceBackend`, `load_backend`); `Engine` is the
onnxruntime CPU implementation, also used directly by `edged ask` and the benchmarks.
"""

from edged.engine.backend import BackendInfo, InferenceBackend, load_backend
from edged.engine.engine import Engine, EngineOptions, usable_cores
from edged.engine.generate import GenerationConfig, GenerationResult, Timing
from edged.engine.manifest import ModelDirError, ModelManifest
from edged.engine.runner import ContextFullError

__all__ = [
    "BackendInfo",
    "ContextFullError",
    "Engine",
    "EngineOptions",
    "GenerationConfig",
    "GenerationResult",
    "InferenceBackend",
    "ModelDirError",
    "ModelManifest",
    "Timing",
    "load_backend",
    "usable_cores",
]
