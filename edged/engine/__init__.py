"""ONNX causal-LM engine: load an edged model directory and generate from it."""

from edged.engine.engine import Engine, EngineOptions, usable_cores
from edged.engine.generate import GenerationConfig, GenerationResult, Timing
from edged.engine.manifest import ModelDirError, ModelManifest
from edged.engine.runner import ContextFullError

__all__ = [
    "ContextFullError",
    "Engine",
    "EngineOptions",
    "GenerationConfig",
    "GenerationResult",
    "ModelDirError",
    "ModelManifest",
    "Timing",
    "usable_cores",
]
