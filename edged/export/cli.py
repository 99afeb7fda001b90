"""The `edged model export` arguments, shared by the daemon's CLI and tools/export_model.py."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .options import (
    BLOCK_SIZES,
    EXPORTERS,
    INT4_ALGORITHMS,
    LM_HEAD_BITS,
    QUANT_METHODS,
    STREAM_BLOCK_SIZE,
    STREAM_LM_HEAD_BITS,
    ExportError,
    ExportOptions,
)

log = logging.getLogger(__name__)

EXPORT_EXTRA_HINT = "install the export tools with: pip install 'edged[export]'"


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="HF checkpoint directory, a GGUF file or a directory holding one "
        "(or a hub id, with network access)",
    )
    parser.add_argument("output", type=Path, help="edged model directory to write")
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="default: auto (stream, the least memory, where it can build the model; else optimum)",
    )
    _add_quantization_arguments(parser)
    parser.add_argument("--name", default=None, help="model name (default: output dir name)")
    parser.add_argument(
        "--description", default=None, help="a sentence on what the model is, for the manifest"
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="longest sequence the engine may run (default: config.max_position_embeddings)",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the parity check with transformers and the quantized agreement measure",
    )
    parser.add_argument(
        "--all-logits",
        dest="last_token_logits",
        action="store_false",
        help="keep logits for every input position (default: last position only)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output")


def _add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", choices=QUANT_METHODS, default="int4", help="default: int4")
    parser.add_argument(
        "--int4-algorithm",
        choices=INT4_ALGORITHMS,
        default="rtn",
        help="how int4 weights are chosen (default: rtn; see README, int4 quality)",
    )
    parser.add_argument(
        "--lm-head-bits",
        type=int,
        choices=LM_HEAD_BITS,
        default=None,
        help="bits of the LM head and the tied embedding in an int4 graph (stream exporter; "
        f"default: {STREAM_LM_HEAD_BITS})",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=None,
        help="weights per scale in every quantized matrix (stream exporter; default: "
        f"{STREAM_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="JSONL of dialogues or texts calibrating --int4-algorithm gptq",
    )


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(
        source=args.source,
        output=args.output,
        quant=args.quant,
        exporter=args.exporter,
        int4_algorithm=args.int4_algorithm,
        lm_head_bits=args.lm_head_bits,
        block_size=args.block_size,
        calibration=args.calibration,
        name=args.name,
        description=args.description,
        context_length=args.context_length,
        verify=args.verify,
        last_token_logits=args.last_token_logits,
        progress=args.progress,
        overwrite=args.overwrite,
    )


def run_export(args: argparse.Namespace) -> int:
    """Run the export the arguments describe; print the manifest; 0 on success, 1 on failure."""
    try:
        opts = options_from_args(args)
        from . import export_model

        manifest = export_model(opts)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"export needs {exc.name or exc}: {EXPORT_EXTRA_HINT}", file=sys.stderr)
        return 1
    print(json.dumps(manifest.to_json(), indent=2))
    return 0
