#!/usr/bin/env python3
"""Build the tiny Qwen3 test model and export it with onnxruntime-genai's builder (GQA layout).

The checkpoint is the very one tools/make_test_model.py builds (same seed, tokenizer, template),
so the two fixtures differ only in the exporter: tests can hold the GroupQueryAttention graph
with its shared past/present buffer to the optimum graph token for token.

    python tools/make_gqa_test_model.py        # regenerate tests/fixtures/tiny-qwen3-gqa-int4

The builder runs in its own virtualenv (transformers 5), created on first use in
~/.cache/edged/venv-genai or $EDGED_GENAI_VENV; see edged/export/genai_builder.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

import make_test_model  # noqa: E402  (a sibling script: its directory is on sys.path)

DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "tiny-qwen3-gqa-int4"
SOURCE_LABEL = "tools/make_gqa_test_model.py"

log = logging.getLogger("make_gqa_test_model")


def _export_model_available() -> bool:
    try:
        from edged.export import export_model  # noqa: F401
    except ImportError:
        return False
    return True


def export_direct(checkpoint: Path, out: Path, quant: str, name: str, progress: bool):
    """Without edged.export.export_model: the builder's graph plus assets and the manifest."""
    from transformers import AutoTokenizer

    from edged.engine.manifest import ModelManifest, Quantization, write_manifest
    from edged.export import genai_builder
    from edged.export.assets import copy_assets, token_ids

    config = json.loads((checkpoint / "config.json").read_text())
    context = int(config["max_position_embeddings"])
    with tempfile.TemporaryDirectory(prefix="edged-gqa-build-") as work:
        opts = argparse.Namespace(
            source=str(checkpoint),
            quant=quant,
            context_length=context,
            last_token_logits=True,
            progress=progress,
        )
        graph_dir = genai_builder.build(opts, Path(work))
        staging = Path(work) / "model"
        staging.mkdir()
        for item in graph_dir.iterdir():
            shutil.copyfile(item, staging / item.name)
        copy_assets(checkpoint, staging)
        ids = token_ids(checkpoint, AutoTokenizer.from_pretrained(checkpoint))
        int4 = quant == "int4"
        manifest = ModelManifest(
            name=name,
            source=SOURCE_LABEL,
            architecture=str(config.get("architectures", ["?"])[0]),
            exporter="ort-genai",
            quantization=Quantization(
                method=quant,
                block_size=genai_builder.INT4_BLOCK_SIZE if int4 else None,
                symmetric=True if int4 else None,
                accuracy_level=genai_builder.INT4_ACCURACY_LEVEL if int4 else None,
                lm_head=int4,
                embedding="GatherBlockQuantized" if int4 else "fp32",
            ),
            context_length=context,
            eos_token_ids=ids.eos,
            reasoning=ids.reasoning,
            pad_token_id=ids.pad,
            bos_token_id=ids.bos,
            logits="last",
            tools={"onnxruntime-genai": genai_builder.GENAI_VERSION},
        )
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
    from edged.engine.manifest import read_manifest

    return read_manifest(out)


def make(out: Path, quant: str = "int4", progress: bool = True, direct: bool = False):
    """Build the tiny checkpoint in a temp dir and export it with the ort-genai exporter."""
    with tempfile.TemporaryDirectory(prefix="edged-tiny-qwen3-gqa-") as tmp:
        checkpoint = make_test_model.build_checkpoint(Path(tmp) / "checkpoint")
        name = f"tiny-qwen3-gqa-{quant}"
        if direct or not _export_model_available():
            log.info("exporting with genai_builder.build and write_manifest directly")
            measured = export_direct(checkpoint, Path(out), quant, name, progress)
            return make_test_model.commit_manifest(Path(out), measured)
        from edged.export import ExportOptions, export_model

        opts = ExportOptions(
            source=str(checkpoint),
            output=Path(out),
            quant=quant,
            exporter="ort-genai",
            name=name,
            progress=progress,
            overwrite=True,
            source_label=SOURCE_LABEL,
        )
        return make_test_model.commit_manifest(Path(out), export_model(opts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="edged model dir to write")
    parser.add_argument("--quant", choices=("int4", "fp32"), default="int4")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="bypass edged.export.export_model (builder + manifest written here)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no builder output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = make(args.out, args.quant, progress=not args.no_progress, direct=args.direct)
    print(json.dumps(manifest.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
