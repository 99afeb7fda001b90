"""Turn a Hugging Face causal-LM checkpoint into an edged model directory.

Importing this package is cheap: torch, transformers, optimum and onnx are imported only when an
export runs, so the daemon's CLI can offer `edged model export` without the [export] extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .options import EXPORTERS, QUANT_METHODS, ExportError, ExportOptions

if TYPE_CHECKING:
    from edged.engine.manifest import ModelManifest

__all__ = ["EXPORTERS", "QUANT_METHODS", "ExportError", "ExportOptions", "export_model"]


def export_model(opts: ExportOptions) -> ModelManifest:
    """Export `opts.source` into `opts.output`; see edged.export.pipeline."""
    from .pipeline import export_model as _export_model

    return _export_model(opts)
