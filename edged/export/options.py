"""What an export is asked to do: `ExportOptions`, and the error every export step raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

QUANT_METHODS = ("int4", "int8", "fp32")
INT4_ALGORITHMS = ("rtn", "rtn-asym", "hqq", "kquant", "gptq")
"""How int4 weights are chosen (onnxruntime's quantizer): round-to-nearest symmetric (`rtn`,
the default) or asymmetric, HQQ's half-quadratic optimisation, the k-quant scale search
(llama.cpp's idea, in onnxruntime's quantizer) or GPTQ with a calibration set. All store the
same MatMulNBits blocks; `edged model eval` measures what each costs."""
EXPORTERS = ("auto", "stream", "optimum", "ort-genai")
"""`stream`: edged's own builder, the GroupQueryAttention graph written tensor by tensor from
the safetensors (Qwen3; int4 round-to-nearest or fp32; the least memory). `optimum`: traced
with optimum (any architecture it knows; int8 and every int4 algorithm). `ort-genai`:
onnxruntime-genai's model builder in its own virtualenv. `auto` (the default): `stream` when
it can build the checkpoint with the options asked for, else `optimum`."""
STREAM_QUANTS = ("int4", "fp32")


class ExportError(Exception):
    """An export that cannot go on; the message names the step, the value and what was expected."""


@dataclass(frozen=True)
class ExportOptions:
    source: str
    """HF checkpoint directory, or a hub id for users with network access (and a hub cache)."""
    output: Path
    """The edged model directory to write; it appears only once every file in it is final."""
    quant: str = "int4"
    """`int4` (MatMulNBits, block 32, LM head and embedding too), `int8` (dynamic) or `fp32`."""
    int4_algorithm: str = "rtn"
    """How int4 weights are chosen: one of INT4_ALGORITHMS (`rtn`: symmetric round-to-nearest)."""
    calibration: Path | None = None
    """JSONL of dialogues (or {"text"} rows) whose activations calibrate `gptq`."""
    exporter: str = "auto"
    """One of EXPORTERS; `auto` picks `stream` where it can, else `optimum`."""
    name: str | None = None
    """Model name in the manifest; default: the output directory's name."""
    context_length: int | None = None
    """Longest sequence the engine may run; default: config.max_position_embeddings."""
    verify: bool = True
    """Check fp32 greedy parity with transformers and measure the quantized graph's agreement."""
    last_token_logits: bool = True
    """Slice the hidden state to the last position before the LM head (logits shape (b, 1, V))."""
    progress: bool = True
    """Show progress bars for the long steps."""
    overwrite: bool = False
    """Replace `output` if it exists and is not empty."""
    description: str | None = None
    """A sentence for the manifest saying what the model is (`edged model info` shows it)."""
    source_label: str | None = None
    """What to record as the manifest's `source`; default: `source` itself. Lets a build from a
    temporary checkpoint (the test model) produce the same manifest every time."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.quant not in QUANT_METHODS:
            raise ExportError(f"quant = {self.quant!r} is not one of {', '.join(QUANT_METHODS)}")
        if self.int4_algorithm not in INT4_ALGORITHMS:
            raise ExportError(
                f"int4_algorithm = {self.int4_algorithm!r} is not one of "
                f"{', '.join(INT4_ALGORITHMS)}"
            )
        if self.int4_algorithm == "gptq" and self.calibration is None:
            raise ExportError("int4_algorithm = 'gptq' needs calibration (a JSONL of dialogues)")
        if self.quant != "int4" and self.int4_algorithm != "rtn":
            raise ExportError(
                f"int4_algorithm = {self.int4_algorithm!r} needs quant = 'int4', not {self.quant!r}"
            )
        if self.exporter in ("ort-genai", "stream") and self.int4_algorithm != "rtn":
            raise ExportError(
                f"int4_algorithm = {self.int4_algorithm!r} is for exporter 'optimum'; the "
                f"{self.exporter} exporter quantizes int4 round-to-nearest (rtn)"
            )
        if self.exporter == "stream" and self.quant not in STREAM_QUANTS:
            raise ExportError(
                f"quant = {self.quant!r} is for exporter 'optimum'; the stream exporter "
                f"writes {', '.join(STREAM_QUANTS)}"
            )
        if self.exporter not in EXPORTERS:
            raise ExportError(f"exporter = {self.exporter!r} is not one of {', '.join(EXPORTERS)}")
        if self.context_length is not None and self.context_length < 1:
            raise ExportError(f"context_length = {self.context_length} must be at least 1")
        if not self.source:
            raise ExportError("source is empty: give a checkpoint directory or a hub id")
