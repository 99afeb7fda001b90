"""Models shipped inside the package (package data), so that `edged demo`, `edged ask`'s
example and the tests find them in a checkout and in an installed wheel alike.

Each is an edged model directory made by the project's own exporter; the command that
regenerates it is in `edged/models/README.md`.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
TINY_QWEN3_INT4 = MODELS_DIR / "tiny-qwen3-int4"
"""A tiny random-weight Qwen3, int4 (about 320 KB): fast tests and the demo's fallback."""
DEMO_MODEL = MODELS_DIR / "demo-clinical-int4"
"""A small Qwen3 trained here on synthetic dialogues (tools/train_demo_model.py): what `edged
demo` runs when no --model is given. Not a medical model; its manifest says so."""
