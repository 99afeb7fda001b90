"""The stream exporter (`edged model export`'s default): the GroupQueryAttention graph written
tensor by tensor from the safetensors, so that exporting needs about one tensor of memory.

What a user relies on: the fp32 graph says exactly what transformers says; the int4 blocks are
onnxruntime's own; the graph is the one onnxruntime-genai's builder makes (so the engine runs it
with its in-place KV buffers); `auto` falls back to optimum for what the stream exporter cannot
build, and asking it for that directly is refused with a message naming the setting.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _models import export_deps_missing, heldout_agreement, make_test_model

from edged.engine.manifest import load_manifest
from edged.export import ExportError, ExportOptions

_MISSING = export_deps_missing()
needs_export = pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "")
FIXTURES = Path(__file__).parent / "fixtures"
GQA_FIXTURE = FIXTURES / "tiny-qwen3-gqa-int4"
DEMO_CHECKPOINT = FIXTURES / "demo-clinical-hf"
LAYERS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if _MISSING:
        pytest.skip(_MISSING)
    builder = make_test_model()
    return builder.build_checkpoint(tmp_path_factory.mktemp("tiny-qwen3") / "checkpoint")


def _export(source: Path, out: Path, **options) -> Path:
    from edged.export import export_model

    export_model(ExportOptions(source=str(source), output=out, progress=False, **options))
    return out


def _feeds(session, ids: list[int]) -> dict[str, np.ndarray]:
    feeds = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
    }
    for item in session.get_inputs():
        if item.name.startswith("past_key_values."):
            _, heads, _, dim = item.shape
            feeds[item.name] = np.zeros((1, heads, 0, dim), dtype=np.float32)
    return feeds


def _logits(graph: Path, ids: list[int]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return session.run(["logits"], _feeds(session, ids))[0][0]


# --- int4 blocks and the safetensors reader ---------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_in_bands_are_onnxruntime_quantizers_bytes(bits):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    from edged.export.blocks import dequantize, quantize_rows

    rng = np.random.default_rng(7)
    weight = rng.normal(size=(300, 96)).astype(np.float32)  # [N out, K in], as HF stores it
    weight[3, 5] = 40.0  # an outlier block
    ours = quantize_rows([weight[:128], weight[128:256], weight[256:]], bits)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight.T.copy())
    assert np.array_equal(ours.packed, packed)
    assert np.array_equal(ours.scales, scales.reshape(ours.scales.shape))
    # And the blocks stand for the weights: half a step off at most, except at the clipped end
    # (the largest magnitude maps to the most negative level, the opposite sign reaches one
    # level less): one step there.
    step = np.abs(np.repeat(ours.scales, 32, axis=1))  # scales carry the block's sign
    error = np.abs(dequantize(ours) - weight) / step
    assert error.max() <= 1.0 and np.mean(error <= 0.5 + 1e-6) > 0.98
    # 8 bits: 16 times the levels of 4, so 16 times less error in the same block.
    if bits == 8:
        four = quantize_rows([weight], 4)
        assert (
            np.abs(dequantize(ours) - weight).mean() < np.abs(dequantize(four) - weight).mean() / 8
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_weights_reader_returns_float32_rows_of_every_dtype(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from edged.export.weights import CheckpointWeights

    table = torch.randn(50, 8).to(getattr(torch, dtype))
    save_file({"a.weight": table, "b.bias": table[0].clone()}, str(tmp_path / "m.safetensors"))
    weights = CheckpointWeights(tmp_path)
    expected = table.float().numpy()
    assert np.array_equal(weights.tensor("a.weight"), expected)
    assert np.array_equal(weights.rows("a.weight", 10, 13), expected[10:13])
    assert np.array_equal(np.concatenate(list(weights.row_bands("a.weight", 16))), expected)
    assert np.array_equal(weights.tensor("b.bias"), expected[0])
    with pytest.raises(ExportError, match="no tensor 'c.weight'"):
        weights.tensor("c.weight")


def test_weights_reader_names_missing_and_truncated_files(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from edged.export.weights import CheckpointWeights

    with pytest.raises(ExportError, match="no \\*.safetensors files.*exporter 'optimum'"):
        CheckpointWeights(tmp_path)
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ExportError, match="tensor 'w' is truncated"):
        CheckpointWeights(tmp_path).tensor("w")


def test_safetensors_written_a_tensor_at_a_time_read_back_by_the_safetensors_library(tmp_path):
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    from edged.export.weights import CheckpointWeights, write_safetensors

    rng = np.random.default_rng(3)
    tensors = {"a.weight": rng.normal(size=(5, 3)), "b.bias": rng.normal(size=(7,))}
    path = tmp_path / "model.safetensors"
    asked = []

    def data(name):
        asked.append(name)
        return tensors[name]

    write_safetensors(path, [(n, t.shape) for n, t in tensors.items()], data)
    assert asked == ["a.weight", "b.bias"]  # each produced once, in order
    loaded = load_file(str(path))
    for name, tensor in tensors.items():
        assert np.array_equal(loaded[name].numpy(), tensor.astype(np.float32))
        assert np.array_equal(CheckpointWeights(tmp_path).tensor(name), tensor.astype(np.float32))
    with pytest.raises(ExportError, match="a.weight: got shape"):
        write_safetensors(path, [("a.weight", (2, 2))], data)


# --- the graph ----------------------------------------------------------------------------------


@needs_export
def test_stream_fp32_graph_is_transformers_to_float_precision(checkpoint, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = _export(checkpoint, tmp_path / "fp32", quant="fp32", last_token_logits=False)
    manifest = load_manifest(out)
    assert manifest.exporter == "stream" and manifest.quantization.method == "fp32"
    assert manifest.verification["fp32_vs_transformers"]["tokens_equal"] is True
    assert manifest.verification["top1_agreement_vs_transformers"] == 1.0

    ids = [5, 17, 300, 42, 99, 7, 1000, 3, 250, 11]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = _logits(out / "model.onnx", ids)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) < 1e-3 * np.max(np.abs(expected))


@needs_export
def test_stream_int4_graph_is_onnxruntime_genai_builders_graph(checkpoint, tmp_path):
    """The committed tiny-qwen3-gqa-int4 was made by onnxruntime-genai's builder from the same
    seeded checkpoint: the stream exporter must make the same graph with the same int4 blocks."""
    import onnx

    # The builder's quantization: every matrix int4, blocks of 32.
    out = _export(checkpoint, tmp_path / "int4", context_length=2048, lm_head_bits=4, block_size=32)
    ours = onnx.load(str(out / "model.onnx"))
    theirs = onnx.load(str(GQA_FIXTURE / "model.onnx"))
    ops = Counter(n.op_type for n in ours.graph.node if n.op_type != "Constant")
    # The same ops, less the Reshape the builder puts on the shared int4 matrix (onnxruntime
    # constant-folds it into a heap copy at every load; here a second initializer over the
    # same bytes takes its place).
    ops["Reshape"] += 1
    # And the LM head's input is the last `logits_to_keep` positions (Neg, Slice: an input with
    # a default of 1, for speculative decoding) where the builder gathers the last one.
    ops.subtract({"Neg": 1, "Slice": 1})
    ops.update({"Gather": 1, "Unsqueeze": 1})
    assert +ops == Counter(n.op_type for n in theirs.graph.node if n.op_type != "Constant")
    extra = {i.name for i in ours.graph.input} - {i.name for i in theirs.graph.input}
    assert extra == {"logits_to_keep"}
    assert sorted(i.name for i in ours.graph.input if i.name != "logits_to_keep") == sorted(
        i.name for i in theirs.graph.input
    )
    assert sorted(o.name for o in ours.graph.output) == sorted(o.name for o in theirs.graph.output)
    # One int4 matrix read by both the embedding and the LM head: the same bytes on disk.
    inits = {t.name: t for t in ours.graph.initializer}
    gather = next(n for n in ours.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in ours.graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits"
    assert inits[gather.input[0]].external_data == inits[head.input[1]].external_data
    stored = [t for t in ours.graph.initializer if t.name.startswith("lm_head.weight_Q4")]
    assert len({tuple((e.key, e.value) for e in t.external_data) for t in stored}) == 1

    ids = [5, 17, 300, 42, 99, 7, 1000, 3]
    for n in range(1, len(ids) + 1):
        a, b = _logits(out / "model.onnx", ids[:n]), _logits(GQA_FIXTURE / "model.onnx", ids[:n])
        assert np.argmax(a[-1]) == np.argmax(b[-1])
        assert np.max(np.abs(a - b)) < 1e-3

    manifest = load_manifest(out)
    assert manifest.exporter == "stream" and manifest.logits == "last_n"
    q = manifest.quantization
    assert (q.method, q.symmetric, q.lm_head, q.embedding) == (
        "int4",
        True,
        True,
        "GatherBlockQuantized",
    )
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["decoder"]["head_size"] == 16


@needs_export
def test_an_eight_bit_lm_head_is_one_matrix_for_the_head_and_the_embedding(checkpoint, tmp_path):
    """--lm-head-bits 8: the tied matrix at 8 bits, read by both the LM head and the embedding
    lookup (one copy on disk), every other matrix int4; its logits are nearer fp32's."""
    import onnx

    from edged.engine import Engine, EngineOptions
    from edged.engine.generate import GenerationConfig

    fp32 = _export(checkpoint, tmp_path / "fp32", quant="fp32", last_token_logits=False)
    four = _export(checkpoint, tmp_path / "h4", last_token_logits=False, lm_head_bits=4)
    eight = _export(checkpoint, tmp_path / "h8", last_token_logits=False, lm_head_bits=8)
    q = load_manifest(eight).quantization
    assert (q.method, q.lm_head, q.lm_head_bits) == ("int4", True, 8)
    assert load_manifest(four).quantization.lm_head_bits is None  # all int4: not written
    graph = onnx.load(str(eight / "model.onnx"))
    inits = {t.name: t for t in graph.graph.initializer}
    gather = next(n for n in graph.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.graph.node if "logits" in n.output)
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in graph.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert bits.pop(head.name) == 8 and bits.pop(gather.name) == 8
    assert set(bits.values()) == {4}
    assert inits[gather.input[0]].external_data == inits[head.input[1]].external_data
    ids = [5, 17, 300, 42, 99, 7, 1000, 3, 250, 11]
    reference = _logits(fp32 / "model.onnx", ids)
    error = {
        n: float(np.abs(_logits(d / "model.onnx", ids) - reference).mean())
        for n, d in (("4", four), ("8", eight))
    }
    assert error["8"] < error["4"], error
    engine = Engine.load(eight, EngineOptions(threads=1, context_length=64))
    result = engine.generate([5, 17, 300], GenerationConfig(max_new_tokens=8))
    assert result.completion_tokens == 8


def test_an_eight_bit_lm_head_is_refused_where_no_exporter_writes_one(tmp_path):
    with pytest.raises(ExportError, match="lm_head_bits = 8 needs quant = 'int4' and exporter"):
        ExportOptions(source="x", output=tmp_path, lm_head_bits=8, exporter="optimum")
    with pytest.raises(ExportError, match="lm_head_bits = 8 needs quant = 'int4'"):
        ExportOptions(source="x", output=tmp_path, lm_head_bits=8, quant="fp32")
    with pytest.raises(ExportError, match="block_size = 64 needs quant = 'int4' and exporter"):
        ExportOptions(source="x", output=tmp_path, block_size=64, exporter="ort-genai")
    with pytest.raises(ExportError, match="lm_head_bits = 6 is not one of 4, 8"):
        ExportOptions(source="x", output=tmp_path, lm_head_bits=6)


@needs_export
def test_demo_model_from_the_stream_exporter_answers_in_the_engine(tmp_path):
    """The trained demo checkpoint: int4 agrees with transformers on nearly every next token of
    the held-out dialogues, and the engine (in-place KV buffers) answers a clinical question
    with it. (The manifest's agreement is measured on the exporter's generic prompts, text
    this model never saw, where its next tokens are near ties: recorded, not held to a bar.)"""
    from edged.engine import Engine, EngineOptions
    from edged.engine.generate import GenerationConfig

    out = _export(DEMO_CHECKPOINT, tmp_path / "demo")
    manifest = load_manifest(out)
    assert manifest.exporter == "stream"
    assert 0.0 < manifest.verification["top1_agreement_vs_transformers"] <= 1.0
    assert heldout_agreement(out, DEMO_CHECKPOINT) >= 0.97
    engine = Engine.load(out, EngineOptions(threads=1, context_length=512))
    assert engine.layout.kind == "gqa" and engine.layout.shared_kv_buffer is True
    # A question as the daemon asks it (system prompt, vitals block, question): a held-out one.
    from edged.eval.datasets import DEFAULT_FILES, load

    messages = load([DEFAULT_FILES[0]])[0].data["messages"][:2]
    result = engine.chat(messages, GenerationConfig(max_new_tokens=160))
    assert result.completion_tokens > 5
    assert len(result.text.split()) >= 12 and "NEWS2" in result.text, result


# --- choosing the exporter ----------------------------------------------------------------------


def _qwen3_dir(tmp_path: Path, **config) -> Path:
    shutil.copy(DEMO_CHECKPOINT / "config.json", tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(config)
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize(
    "options, config, expected",
    [
        ({}, {}, "stream"),
        ({"quant": "fp32"}, {}, "stream"),
        ({"quant": "int8"}, {}, "optimum"),
        ({"int4_algorithm": "hqq"}, {}, "optimum"),
        ({}, {"architectures": ["LlamaForCausalLM"]}, "optimum"),
        ({}, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "optimum"),
        ({}, {"rope_scaling": {"rope_type": "default"}}, "stream"),
        ({"exporter": "optimum"}, {}, "optimum"),
    ],
)
def test_auto_exporter_is_stream_where_it_can_build_else_optimum(
    tmp_path, options, config, expected
):
    from edged.export.pipeline import choose_exporter

    source = _qwen3_dir(tmp_path, **config)
    opts = ExportOptions(source=str(source), output=tmp_path / "out", **options)
    data = json.loads((source / "config.json").read_text())
    assert choose_exporter(opts, data, source) == expected


def test_auto_exporter_needs_safetensors(tmp_path):
    from edged.export.pipeline import choose_exporter

    source = _qwen3_dir(tmp_path)
    (source / "model.safetensors").unlink()
    opts = ExportOptions(source=str(source), output=tmp_path / "out")
    assert choose_exporter(opts, json.loads((source / "config.json").read_text()), source) == (
        "optimum"
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"quant": "int8"}, "quant = 'int8' is for exporter 'optimum'"),
        ({"int4_algorithm": "gptq", "calibration": Path("c.jsonl")}, "quantizes int4 round-to"),
    ],
)
def test_stream_exporter_refuses_what_it_cannot_write(options, message):
    with pytest.raises(ExportError, match=message):
        ExportOptions(source="ckpt", output=Path("out"), exporter="stream", **options)


@needs_export
def test_stream_exporter_refuses_an_unsupported_checkpoint_naming_the_setting(tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(DEMO_CHECKPOINT, source)
    config = json.loads((source / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="rope_scaling = .*yarn.* is not supported"):
        _export(source, tmp_path / "out", exporter="stream")
    assert not (tmp_path / "out").exists()
