"""`model.type: onnxruntime-cpu`: the onnxruntime engine on the CPU execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edged.engine.draft import DraftSettings
from edged.engine.engine import Engine, EngineOptions

if TYPE_CHECKING:
    from edged.config.models import ModelConfig


def load(
    config: ModelConfig, preferred_cores: tuple[int, ...], cache_dir: Path | None = None
) -> Engine:
    return Engine.load(
        config.path,
        EngineOptions(
            threads=config.threads,
            context_length=config.context_length,
            verify_hashes=config.verify_hashes,
            spin=config.spin_threads,
            preferred_cores=preferred_cores,
            speculation=DraftSettings() if config.speculation else None,
            prepacked_cache=cache_dir / "prepacked"
            if cache_dir is not None and config.prepacked_cache
            else None,
        ),
    )
