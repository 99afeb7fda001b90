"""`export_model`: checkpoint in, finished edged model directory out.

Steps: fp32 ONNX export, last-token logits edit, fp32 parity with transformers, quantization,
quantized-vs-fp32 agreement, tokenizer/config assets, manifest. Everything is built in a
sibling staging directory and renamed into place at the end, so `output` never holds a
half-written model (the manifest hashes every file in it).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from edged.engine.manifest import MANIFEST_NAME, ModelManifest, write_manifest

from . import assets, verify
from . import graph as g
from .gguf_import import find_gguf
from .options import ExportError, ExportOptions
from .progress import Stages

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
TOOL_DISTRIBUTIONS = ("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime", "onnx")


@dataclass
class _Build:
    """What the steps hand to each other."""

    opts: ExportOptions
    checkpoint: Path
    work: Path
    staging: Path
    stages: Stages
    tokenizer: Any
    context_length: int
    verification: dict[str, Any] = field(default_factory=dict)


def export_model(opts: ExportOptions) -> ModelManifest:
    """Export `opts.source` into `opts.output` and return the manifest written there."""
    output = opts.output
    _check_output(output, opts.overwrite)
    from transformers import AutoTokenizer

    gguf_file = find_gguf(opts.source)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    stages = Stages(["import gguf"] if gguf_file is not None else [], opts.progress)
    try:
        with tempfile.TemporaryDirectory(prefix="edged-export-") as work:
            checkpoint, imported = _checkpoint(opts, gguf_file, Path(work), stages)
            config = _read_config(checkpoint)
            architecture = _architecture(config, checkpoint)
            opts = replace(opts, exporter=choose_exporter(opts, config, checkpoint))
            stages.extend(_stage_names(opts))
            build = _Build(
                opts=opts,
                checkpoint=checkpoint,
                work=Path(work),
                staging=staging,
                stages=stages,
                tokenizer=AutoTokenizer.from_pretrained(checkpoint),
                context_length=_context_length(opts, config),
            )
            if imported is not None:
                build.verification["gguf"] = imported
            _BUILDERS[opts.exporter](build)
            with stages.run("assets and manifest"):
                assets.copy_assets(checkpoint, staging)
                manifest = _write_manifest(build, architecture)
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        stages.close()
    took = ", ".join(f"{k} {v:.1f} s" for k, v in stages.durations.items())
    log.info("exported %s to %s (%s)", opts.source, output, took)
    return manifest


def _checkpoint(
    opts: ExportOptions, gguf_file: Path | None, work: Path, stages: Stages
) -> tuple[Path, dict[str, Any] | None]:
    """The HF checkpoint to export: the source itself, or one rebuilt from its GGUF."""
    if gguf_file is None:
        from .optimum_export import resolve_source

        return resolve_source(opts.source), None
    from .gguf_import import gguf_to_checkpoint

    with stages.run("import gguf"):
        summary = gguf_to_checkpoint(gguf_file, work / "from-gguf")
    return work / "from-gguf", {"file": gguf_file.name, "tensor_types": summary.tensor_types}


def choose_exporter(opts: ExportOptions, config: dict[str, Any], checkpoint: Path) -> str:
    """The exporter `auto` stands for: `stream` (least memory) when it can build this
    checkpoint as asked, else `optimum`; any other choice is kept as given."""
    if opts.exporter != "auto":
        return opts.exporter
    why = stream_unsupported(opts, config, checkpoint)
    if why is None:
        return "stream"
    asked = [
        f"{name} = {value}"
        for name, value in (("lm_head_bits", opts.lm_head_bits), ("block_size", opts.block_size))
        if value is not None
    ]
    if asked:
        raise ExportError(
            f"{' and '.join(asked)}: the stream exporter's settings, and it cannot build this "
            f"checkpoint: {why}"
        )
    log.info("exporter auto: using optimum, since the stream exporter cannot: %s", why)
    return "optimum"


def stream_unsupported(opts: ExportOptions, config: dict[str, Any], checkpoint: Path) -> str | None:
    """Why the stream exporter cannot do this export, or None."""
    from .stream_graph import unsupported_setting

    try:
        # The options it can take are checked where every exporter's are: ExportOptions.
        replace(opts, exporter="stream")
    except ExportError as exc:
        return str(exc)
    if not any(checkpoint.glob("*.safetensors")):
        return f"{checkpoint} holds no *.safetensors"
    return unsupported_setting(config)


def _stage_names(opts: ExportOptions) -> list[str]:
    if opts.exporter in ("ort-genai", "stream"):
        names = [f"build ({opts.exporter})"]
        if opts.verify:
            names.append("verify vs transformers")
    else:
        names = ["export fp32"]
        if opts.last_token_logits:
            names.append("slice logits")
        if opts.verify:
            names.append("verify fp32")
        names.append(f"quantize {opts.quant}")
        if opts.verify and opts.quant != "fp32":
            names.append(f"verify {opts.quant}")
    return [*names, "assets and manifest"]


def _build_optimum(build: _Build) -> None:
    import onnx

    from .optimum_export import export_fp32
    from .quantize import quantize_int4, quantize_int8, save_model

    opts, stages = build.opts, build.stages
    with stages.run("export fp32"):
        full = export_fp32(build.checkpoint, build.work / "fp32")
    fp32 = full
    if opts.last_token_logits:
        with stages.run("slice logits"):
            model = g.load_graph(full)
            g.slice_to_last_token(model)
            # Saved next to the full graph so both point at the same external weight file.
            fp32 = full.with_name("model.last.onnx")
            onnx.save_model(model, str(fp32))

    reference = None
    if opts.verify:
        with stages.run("verify fp32"):
            reference = _verify_fp32(build, full, fp32)

    out = build.staging / GRAPH_FILE
    with stages.run(f"quantize {opts.quant}"):
        if opts.quant == "int4":
            reader = None
            if opts.int4_algorithm == "gptq":
                from .calibration import CalibrationTexts

                reader = CalibrationTexts(fp32, build.tokenizer, opts.calibration)
            quantize_int4(fp32, out, opts.int4_algorithm, reader)
        elif opts.quant == "int8":
            quantize_int8(fp32, out)
        else:
            save_model(onnx.load(str(fp32)), out)

    if reference is not None and opts.quant != "fp32":
        with stages.run(f"verify {opts.quant}"):
            prompts = [build.tokenizer.encode(p) for p in verify.AGREEMENT_PROMPTS]
            candidate = verify.OnnxCausalLM(out)
            agreement, positions = verify.top1_agreement(
                candidate, reference, prompts, progress=opts.progress
            )
            build.verification["top1_agreement_vs_fp32"] = round(agreement, 4)
            build.verification["prompts"] = len(prompts)
            build.verification["positions"] = positions
            log.info("%s agrees with fp32 on %.1f %% of next tokens", opts.quant, 100 * agreement)


def _verify_fp32(build: _Build, full: Path, fp32: Path) -> verify.OnnxCausalLM:
    """Greedy parity of the fp32 graph with transformers (and of the sliced logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build.tokenizer
    reference = verify.OnnxCausalLM(fp32)
    prompt = verify.prompt_ids(tokenizer)
    if fp32 != full:
        diff = verify.check_last_logits(verify.OnnxCausalLM(full), reference, prompt)
        build.verification["last_token_logits_max_abs_diff"] = float(f"{diff:.2g}")
    ids = assets.token_ids(build.checkpoint, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(build.checkpoint, dtype=torch.float32).eval()
    build.verification["fp32_vs_transformers"] = verify.check_greedy_parity(
        reference, model, prompt, ids.eos, ids.pad
    )
    return reference


def _build_genai(build: _Build) -> None:
    """onnxruntime-genai's model builder (GroupQueryAttention layout), owned by genai_builder."""
    try:
        from . import genai_builder
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.genai_builder":
            raise
        raise ExportError(
            "exporter = 'ort-genai' needs edged/export/genai_builder.py, which this "
            "installation does not have; use exporter = 'optimum'"
        ) from exc
    with build.stages.run("build (ort-genai)"):
        # The checkpoint, not the source: it may have been rebuilt from a GGUF.
        opts = replace(build.opts, source=str(build.checkpoint))
        built = Path(genai_builder.build(opts, build.work / "genai"))
        if not (built / GRAPH_FILE).is_file():
            raise ExportError(f"genai_builder.build returned {built} without {GRAPH_FILE}")
        for path in sorted(built.iterdir()):
            if path.is_file() and path.name != MANIFEST_NAME:
                shutil.copyfile(path, build.staging / path.name)
    if build.opts.verify:
        with build.stages.run("verify vs transformers"):
            _verify_against_transformers(build, build.staging / GRAPH_FILE)


def _build_stream(build: _Build) -> None:
    """edged's own builder: the GroupQueryAttention graph, one tensor at a time."""
    from .stream_graph import build as build_graph

    opts = build.opts
    with build.stages.run("build (stream)"):
        build_graph(
            build.checkpoint,
            build.staging,
            opts.quant,
            build.context_length,
            opts.last_token_logits,
            opts.progress,
            *opts.stream_layout,
        )
    if opts.verify:
        with build.stages.run("verify vs transformers"):
            _verify_against_transformers(build, build.staging / GRAPH_FILE)


REFERENCE_FP32_MAX_BYTES = 4 << 30
"""Above this many bytes of fp32 weights (Qwen3-1.7B has 6.9 GB) a quantized export is checked
against transformers in bfloat16, the dtype such models are published in, so that verification
needs half the memory; an fp32 export is always checked in fp32, token for token."""


def _reference_dtype(build: _Build) -> str:
    if build.opts.quant == "fp32":
        return "float32"
    from .weights import CheckpointWeights

    try:
        weights = CheckpointWeights(build.checkpoint)
    except ExportError:
        return "float32"
    fp32_bytes = 4 * weights.parameter_count()
    return "float32" if fp32_bytes <= REFERENCE_FP32_MAX_BYTES else "bfloat16"


def _verify_against_transformers(build: _Build, graph: Path) -> None:
    """Transformers first (then freed), the graph second: one model in memory at a time. An
    fp32 graph must reproduce the greedy tokens; a quantized one has its agreement recorded."""
    ids = assets.token_ids(build.checkpoint, build.tokenizer)
    prompt = verify.prompt_ids(build.tokenizer) if build.opts.quant == "fp32" else None
    prompts = [build.tokenizer.encode(p) for p in verify.AGREEMENT_PROMPTS]
    reference = verify.transformers_reference(
        build.checkpoint, prompt, prompts, ids.eos, ids.pad, _reference_dtype(build)
    )
    candidate = verify.OnnxCausalLM(graph)
    if prompt is not None and reference.greedy is not None:
        got = candidate.greedy(prompt, verify.GREEDY_NEW_TOKENS, ids.eos)
        build.verification["fp32_vs_transformers"] = verify.check_greedy_tokens(
            got, reference.greedy, len(prompt)
        )
    agreement, total = verify.agreement_with(candidate, reference, prompts)
    build.verification["top1_agreement_vs_transformers"] = round(agreement, 4)
    build.verification["prompts"] = len(prompts)
    build.verification["positions"] = total
    if reference.dtype != "float32":
        build.verification["reference_dtype"] = reference.dtype


def _write_manifest(build: _Build, architecture: str) -> ModelManifest:
    opts = build.opts
    final = g.load_graph(build.staging / GRAPH_FILE)
    quantization = g.describe_quantization(final)
    if opts.quant == "int4" and opts.int4_algorithm != "rtn":
        quantization = replace(quantization, algorithm=opts.int4_algorithm)
    if quantization.method != opts.quant:
        raise ExportError(
            f"quant = {opts.quant!r} was asked but the graph holds {quantization.method!r}"
        )
    ids = assets.token_ids(build.checkpoint, build.tokenizer)
    manifest = ModelManifest(
        name=opts.name or opts.output.name,
        source=opts.source_label or opts.source,
        architecture=architecture,
        exporter=opts.exporter,
        quantization=quantization,
        context_length=build.context_length,
        eos_token_ids=ids.eos,
        graph_file=GRAPH_FILE,
        reasoning=ids.reasoning,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        logits=g.logits_mode(final),
        verification=build.verification,
        tools=tool_versions(),
        description=opts.description,
    )
    return write_manifest(build.staging, manifest)


_BUILDERS = {
    "stream": _build_stream,
    "optimum": _build_optimum,
    "ort-genai": _build_genai,
}


def tool_versions() -> dict[str, str]:
    import edged

    versions = {"edged": edged.__version__}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"output = {str(output)!r} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(
            f"output = {str(output)!r} exists and is not empty; pass overwrite (--overwrite) "
            "to replace it"
        )


def _publish(staging: Path, output: Path) -> None:
    """Swap the finished staging directory in; the old model goes only once the new is there."""
    if not output.exists():
        staging.rename(output)
        return
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    output.rename(old)
    staging.rename(output)
    shutil.rmtree(old)


def _read_config(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{checkpoint / 'config.json'}: not readable JSON: {exc}") from exc


def _architecture(config: dict[str, Any], checkpoint: Path) -> str:
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list):
        raise ExportError(f"{checkpoint / 'config.json'}: `architectures` is missing or empty")
    return str(archs[0])


def _context_length(opts: ExportOptions, config: dict[str, Any]) -> int:
    limit = config.get("max_position_embeddings")
    if opts.context_length is None:
        if not isinstance(limit, int):
            raise ExportError(
                "config.json has no max_position_embeddings; pass context_length explicitly"
            )
        return limit
    if isinstance(limit, int) and opts.context_length > limit:
        raise ExportError(
            f"context_length = {opts.context_length} exceeds config.max_position_embeddings "
            f"= {limit}"
        )
    return opts.context_length
