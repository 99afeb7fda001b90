"""The edged model directory and its manifest, `edged-model.json`.

An edged model directory is what `edged model export` writes and what the engine loads:

    model.onnx (+ model.onnx.data)   the graph, optimum layout or GroupQueryAttention layout
    tokenizer.json, tokenizer_config.json, chat_template.jinja (when the checkpoint has one)
    config.json, generation_config.json
    edged-model.json                 this manifest

The manifest records where the model came from and how it was made, and the sha256 of every
other file, so that a board never runs a half-copied or tampered model: the engine refuses a
directory whose files do not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "edged-model.json"
FORMAT = "edged-model/1"
_HASH_CHUNK = 1 << 20


class ModelDirError(Exception):
    """A model directory that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Quantization:
    method: str
    """`int4` (MatMulNBits), `int8` (dynamic QInt8) or `fp32` (none)."""
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    lm_head: bool | None = None
    """Whether the LM head MatMul was quantized too."""
    embedding: str | None = None
    """How the token embedding is stored: `GatherBlockQuantized` (int4) or `fp32`."""
    algorithm: str | None = None
    """How int4 weights were chosen when not by symmetric round-to-nearest: `rtn-asym`, `hqq`,
    `kquant`, `gptq` (edged.export.quantize.INT4_ALGORITHMS). Written only when set."""
    lm_head_bits: int | None = None
    """The LM head's bits (and a tied embedding's, the same matrix) when they differ from
    `method`'s: 8 in an int4 graph. Written only when set."""


@dataclass(frozen=True)
class Reasoning:
    start: str = "<think>"
    end: str = "</think>"


@dataclass(frozen=True)
class ModelManifest:
    name: str
    source: str
    architecture: str
    exporter: str
    """`optimum` (past/present per layer, growing), or `stream` / `ort-genai` (both the
    GroupQueryAttention layout with one in-place KV buffer per layer)."""
    quantization: Quantization
    context_length: int
    eos_token_ids: tuple[int, ...]
    graph_file: str = "model.onnx"
    reasoning: Reasoning | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    logits: str = "all"
    """`all`: logits for every input position; `last`: the graph slices to the last position;
    `last_n`: to the last `logits_to_keep` positions, an input that defaults to 1."""
    verification: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """Relative path -> sha256 hex of every file of the directory but the manifest."""
    format: str = FORMAT
    description: str | None = None
    """What the model is, in a sentence, for people (`edged model info`, the demo); e.g.
    that a demo model is not a medical model. Written only when set."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        if self.description is None:
            del data["description"]  # older manifests, byte-identical
        for key in ("algorithm", "lm_head_bits"):  # older manifests, byte-identical
            if data["quantization"][key] is None:
                del data["quantization"][key]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> ModelManifest:
        try:
            fmt = data.get("format")
            if fmt != FORMAT:
                raise ModelDirError(f"{where}: format = {fmt!r}, expected {FORMAT!r}")
            quant = Quantization(**data["quantization"])
            reasoning = Reasoning(**data["reasoning"]) if data.get("reasoning") else None
            return cls(
                name=str(data["name"]),
                source=str(data["source"]),
                architecture=str(data["architecture"]),
                exporter=str(data["exporter"]),
                quantization=quant,
                context_length=int(data["context_length"]),
                eos_token_ids=tuple(int(i) for i in data["eos_token_ids"]),
                graph_file=str(data.get("graph_file", "model.onnx")),
                reasoning=reasoning,
                pad_token_id=data.get("pad_token_id"),
                bos_token_id=data.get("bos_token_id"),
                logits=str(data.get("logits", "all")),
                verification=dict(data.get("verification") or {}),
                tools=dict(data.get("tools") or {}),
                files=dict(data["files"]),
                description=data.get("description"),
            )
        except KeyError as exc:
            raise ModelDirError(f"{where}: required key {exc.args[0]!r} is missing") from exc
        except (TypeError, ValueError) as exc:
            raise ModelDirError(f"{where}: malformed manifest: {exc}") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_directory(model_dir: Path) -> dict[str, str]:
    """sha256 of every regular file below `model_dir` except the manifest, by relative path."""
    files: dict[str, str] = {}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            files[path.relative_to(model_dir).as_posix()] = file_sha256(path)
    return files


def write_manifest(model_dir: Path, manifest: ModelManifest) -> ModelManifest:
    """Hash the directory's files into `manifest.files` and write `edged-model.json`."""
    from dataclasses import replace

    final = replace(manifest, files=hash_directory(model_dir))
    (model_dir / MANIFEST_NAME).write_text(json.dumps(final.to_json(), indent=2) + "\n")
    return final


def read_manifest(model_dir: Path) -> ModelManifest:
    """Read the manifest without checking hashes (for `edged model info`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {str(model_dir)!r} does not exist")
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelDirError(
            f"{model_dir}: no {MANIFEST_NAME}; export the model with `edged model export`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return ModelManifest.from_json(data, where=str(path))


def verify_files(model_dir: Path, manifest: ModelManifest) -> None:
    """Raise ModelDirError naming the first file that is missing or whose sha256 differs."""
    model_dir = Path(model_dir)
    if manifest.graph_file not in manifest.files:
        raise ModelDirError(
            f"{model_dir / MANIFEST_NAME}: graph file {manifest.graph_file!r} "
            "is not listed in files"
        )
    for rel, expected in sorted(manifest.files.items()):
        path = model_dir / rel
        if not path.is_file():
            raise ModelDirError(f"{path}: listed in {MANIFEST_NAME} but missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ModelDirError(
                f"{path}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}…; "
                "the file was changed or partly copied: copy or export the model again"
            )


def load_manifest(model_dir: Path, verify: bool = True) -> ModelManifest:
    manifest = read_manifest(model_dir)
    if verify:
        verify_files(Path(model_dir), manifest)
    return manifest
