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
BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Weights per scale along K in the stream exporter's quantized matrices (MatMulNBits and
GatherBlockQuantized take any power of two from 16): more per block is a smaller file (4.5 bits
a weight at 64 instead of 5 at 32: the scales are float32) and coarser rounding."""
LM_HEAD_BITS = (4, 8)
"""Bits of an int4 graph's LM head (the tied embedding with it): 4 like every other matrix, or
8, as llama.cpp keeps its output matrix at 6 bits in a 4-bit file (Q6_K in Q4_K_M and Q4_0):
the last matrix's rounding reaches every logit directly. The stream exporter writes both."""
STREAM_LM_HEAD_BITS = 8
STREAM_BLOCK_SIZE = 32
"""The stream exporter's defaults, measured (README, "int4 quality"; one run, the demo model):
an 8-bit head with int4 blocks of 32 matches llama.cpp's Q4_K_M on perplexity (1.0515 both,
fp32 1.0513), where all-int4 costs 0.0005 more and 6x the KL. Its file is 12 % larger than
Q4_K_M (1.24 against 1.10 GB at the Qwen3-1.7B shape) and decodes 7 % slower than all-int4.
Blocks of 64 would be 9 % smaller and as good here, but onnxruntime's int8-activation kernels
for them (x86, AVX-512) compute a row differently in a batch of four or more than alone: a
speculative decoder's verification would then change answers (edged.engine.draft)."""


_STREAM_ONLY_BY = ("auto", "stream")
"""Exporters that take the stream exporter's own settings (lm_head_bits, block_size): `auto`
as long as it takes `stream`; it falls back to `optimum` only for what `stream` cannot build,
then naming why."""


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
    lm_head_bits: int | None = None
    """One of LM_HEAD_BITS: the LM head's (and a tied embedding's) bits in an int4 graph by the
    stream exporter; None = its default, STREAM_LM_HEAD_BITS (other exporters: 4)."""
    block_size: int | None = None
    """One of BLOCK_SIZES: weights per scale in the stream exporter's quantized matrices;
    None = its default, STREAM_BLOCK_SIZE (other exporters: 32)."""
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
        self._check_choices()
        self._check_algorithm()
        self._check_stream_settings()
        if self.context_length is not None and self.context_length < 1:
            raise ExportError(f"context_length = {self.context_length} must be at least 1")
        if not self.source:
            raise ExportError("source is empty: give a checkpoint directory or a hub id")

    def _check_choices(self) -> None:
        for name, value, allowed in (
            ("quant", self.quant, QUANT_METHODS),
            ("int4_algorithm", self.int4_algorithm, INT4_ALGORITHMS),
            ("exporter", self.exporter, EXPORTERS),
            ("lm_head_bits", self.lm_head_bits, (None, *LM_HEAD_BITS)),
            ("block_size", self.block_size, (None, *BLOCK_SIZES)),
        ):
            if value not in allowed:
                shown = ", ".join(str(a) for a in allowed if a is not None)
                raise ExportError(f"{name} = {value!r} is not one of {shown}")

    def _check_algorithm(self) -> None:
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

    def _check_stream_settings(self) -> None:
        if self.exporter == "stream" and self.quant not in STREAM_QUANTS:
            raise ExportError(
                f"quant = {self.quant!r} is for exporter 'optimum'; the stream exporter "
                f"writes {', '.join(STREAM_QUANTS)}"
            )
        for name, value in (("lm_head_bits", self.lm_head_bits), ("block_size", self.block_size)):
            if value is not None and (self.quant != "int4" or self.exporter not in _STREAM_ONLY_BY):
                raise ExportError(
                    f"{name} = {value} needs quant = 'int4' and exporter 'stream' (or 'auto'), "
                    f"not quant = {self.quant!r} with exporter {self.exporter!r}"
                )

    @property
    def stream_layout(self) -> tuple[int, int]:
        """(LM head bits, block size) the stream exporter writes: as asked, else its default."""
        return (
            self.lm_head_bits if self.lm_head_bits is not None else STREAM_LM_HEAD_BITS,
            self.block_size if self.block_size is not None else STREAM_BLOCK_SIZE,
        )
