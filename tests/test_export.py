"""The export: an HF checkpoint becomes an edged model directory that says what the checkpoint says.

Builds the tiny Qwen3 checkpoint once per module (a second or two) and exports it in each
format the tests need; the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _models import TINY_QWEN3_INT4, export_deps_missing, make_test_model

from edged.engine.manifest import load_manifest, read_manifest
from edged.export import ExportError, ExportOptions

_MISSING = export_deps_missing()
VOCAB, HIDDEN, LAYERS = 1024, 64, 2
LINEAR_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _onnx_runner(graph: Path):
    from edged.export.verify import OnnxCausalLM

    return OnnxCausalLM(graph, threads=1)


@pytest.fixture(scope="module")
def builder():
    if _MISSING:
        pytest.skip(_MISSING)
    return make_test_model()


@pytest.fixture(scope="module")
def checkpoint(builder, tmp_path_factory) -> Path:
    return builder.build_checkpoint(tmp_path_factory.mktemp("tiny-qwen3") / "checkpoint")


@pytest.fixture(scope="module")
def export(builder, checkpoint, tmp_path_factory):
    """export(quant, last_token_logits=True) -> model dir, each variant exported once."""
    from edged.export import export_model

    done: dict[tuple[str, bool], Path] = {}

    def run(quant: str, last_token_logits: bool = True) -> Path:
        key = (quant, last_token_logits)
        if key not in done:
            out = tmp_path_factory.mktemp("export") / f"{quant}-{'last' if key[1] else 'all'}"
            opts = builder.fixture_options(checkpoint, out, quant, progress=False)
            if not last_token_logits:
                opts = ExportOptions(**{**opts.__dict__, "last_token_logits": False})
            export_model(opts)
            done[key] = out
        return done[key]

    return run


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("quant", "int3", "quant = 'int3' is not one of int4, int8, fp32"),
        ("exporter", "tflite", "exporter = 'tflite'"),
        ("context_length", 0, "context_length = 0 must be at least 1"),
    ],
)
def test_export_options_reject_bad_values_naming_field_and_value(field, value, message):
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        ExportOptions(source="ckpt", output=Path("out"), **{field: value})


def test_export_refuses_non_empty_output_without_overwrite(tmp_path):
    from edged.export.pipeline import _check_output

    (tmp_path / "model.onnx").write_bytes(b"old model")
    with pytest.raises(ExportError, match="exists and is not empty; pass overwrite"):
        _check_output(tmp_path, overwrite=False)
    _check_output(tmp_path, overwrite=True)


def test_cli_arguments_map_to_export_options():
    import argparse

    from edged.export.cli import add_export_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args(["ckpt", "out", "--quant", "int8", "--all-logits", "--no-verify"])
    opts = options_from_args(args)
    assert (opts.quant, opts.last_token_logits, opts.verify) == ("int8", False, False)
    assert opts.output == Path("out") and opts.exporter == "auto"


def test_committed_fixture_hashes_match_and_manifest_says_int4():
    manifest = load_manifest(TINY_QWEN3_INT4, verify=True)
    assert manifest.quantization.method == "int4"
    assert manifest.quantization.block_size == 32
    assert manifest.quantization.lm_head is True
    assert manifest.quantization.embedding == "GatherBlockQuantized"
    assert manifest.logits == "last"
    assert manifest.architecture == "Qwen3ForCausalLM"
    assert manifest.reasoning is not None and manifest.reasoning.start == "<think>"
    assert manifest.verification["fp32_vs_transformers"]["tokens_equal"] is True
    assert set(manifest.files) == {
        p.name for p in TINY_QWEN3_INT4.iterdir() if p.name != "edged-model.json"
    }
    assert (TINY_QWEN3_INT4 / "model.onnx").stat().st_size < 2 * 1024 * 1024


def needs_export(test):
    """Marked `export`, and skipped with the reason when the [export] extra is missing."""
    test = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")(test)
    return pytest.mark.export(test)


@needs_export
def test_fp32_export_greedy_tokens_equal_transformers(export, checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export("fp32")
    manifest = load_manifest(out)
    parity = manifest.verification["fp32_vs_transformers"]
    assert parity["tokens_equal"] is True and parity["new_tokens"] == 24

    # An independent prompt, not the one the export verified with.
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.encode("Temperature 38.4 °C, SpO2 91 %, dizzy – 心率 112")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            eos_token_id=list(manifest.eos_token_ids),
            pad_token_id=manifest.pad_token_id,
        )[0, len(prompt) :].tolist()
    onnx_tokens = _onnx_runner(out / "model.onnx").greedy(prompt, 20, manifest.eos_token_ids)
    assert onnx_tokens == generated
    assert len(set(generated)) >= 4, "the random model repeats itself: parity would prove nothing"


@needs_export
def test_int4_export_quantizes_every_matmul_lm_head_and_embedding(export):
    import onnx

    out = export("int4")
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    ops = Counter(node.op_type for node in graph.node)
    constants = {init.name for init in graph.initializer}
    float_weight_matmuls = [
        n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants
    ]
    assert float_weight_matmuls == []
    assert ops["MatMulNBits"] == LAYERS * LINEAR_PER_LAYER + 1  # + the LM head
    head = next(n for n in graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
    embed = next(n for n in graph.node if "input_ids" in n.input)
    assert embed.op_type == "GatherBlockQuantized"
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    vocab_shaped = [
        init.name
        for init in graph.initializer
        if init.data_type in float_types and tuple(init.dims) in {(VOCAB, HIDDEN), (HIDDEN, VOCAB)}
    ]
    assert vocab_shaped == []

    manifest = load_manifest(out)
    assert manifest.quantization.method == "int4" and manifest.quantization.symmetric is True
    # The int4 graph runs, and its agreement with fp32 is recorded. The random model is chaotic,
    # so agreement is far below a real model's, yet far above chance (1/1024).
    tokens = _onnx_runner(out / "model.onnx").greedy([5, 17, 300], 8, eos=[])
    assert len(tokens) == 8 and all(0 <= t < VOCAB for t in tokens)
    agreement = manifest.verification["top1_agreement_vs_fp32"]
    assert 0.2 < agreement <= 1.0
    assert manifest.verification["prompts"] == 8


@needs_export
def test_int8_export_quantizes_matmuls_dynamically(export):
    import onnx

    out = export("int8")
    manifest = load_manifest(out)
    assert manifest.quantization.method == "int8"
    assert manifest.quantization.lm_head is True
    assert manifest.quantization.embedding == "fp32"
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["MatMulInteger"] == LAYERS * LINEAR_PER_LAYER + 1
    assert 0.2 < manifest.verification["top1_agreement_vs_fp32"] <= 1.0


@needs_export
def test_last_token_logits_graph_equals_last_row_of_full_graph(export, checkpoint):
    from transformers import AutoTokenizer

    last_dir, full_dir = export("fp32", True), export("fp32", False)
    assert read_manifest(last_dir).logits == "last"
    assert read_manifest(full_dir).logits == "all"
    last, full = _onnx_runner(last_dir / "model.onnx"), _onnx_runner(full_dir / "model.onnx")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for text in ("My heart rate is 120 bpm.", "Fever 39.2 °C with a stiff neck and headache"):
        ids = tokenizer.encode(text)
        full_logits = full.logits(ids)
        last_logits = last.logits(ids)
        assert full_logits.shape == (1, len(ids), VOCAB)
        assert last_logits.shape == (1, 1, VOCAB)
        np.testing.assert_allclose(last_logits[0, 0], full_logits[0, -1], rtol=0, atol=1e-5)
        # Decode steps after the prefill agree too (one new token each).
        step_last, past_last = last.step(ids, last.empty_past())
        step_full, past_full = full.step(ids, full.empty_past())
        np.testing.assert_allclose(step_last, step_full, rtol=0, atol=1e-5)


@needs_export
def test_export_reproduces_the_committed_fixture_byte_for_byte(export):
    fixture = read_manifest(TINY_QWEN3_INT4)
    rebuilt = read_manifest(export("int4"))
    if rebuilt.tools != fixture.tools:
        pytest.skip(f"fixture made with {fixture.tools}, this environment has {rebuilt.tools}")
    assert rebuilt.files == fixture.files, (
        "the committed fixture is stale: regenerate it with python tools/make_test_model.py"
    )


CONVERSATIONS = [
    ([{"role": "user", "content": "My SpO2 is 91%, is that bad?"}], {}),
    (
        [
            {"role": "system", "content": "You are a careful triage assistant. Be brief."},
            {"role": "user", "content": "Temperature 38.4 °C and a headache."},
        ],
        {"enable_thinking": False},
    ),
    (
        [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Heart rate 128 bpm at rest."},
            {
                "role": "assistant",
                "content": "<think>\nTachycardia at rest.\n</think>\n\nPlease sit down.",
            },
            {"role": "user", "content": "Now it is 96 bpm. 心率正常吗？"},
        ],
        {"enable_thinking": True},
    ),
    (
        [
            {"role": "user", "content": "Dizzy when standing."},
            {
                "role": "assistant",
                "content": "Stand up slowly.",
                "reasoning_content": "Orthostatic symptoms.",
            },
        ],
        {"add_generation_prompt": False},
    ),
]


@needs_export
@pytest.mark.parametrize("messages, kwargs", CONVERSATIONS)
def test_fixture_chat_template_renders_like_transformers(messages, kwargs):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer

    def raise_exception(message):
        raise ValueError(message)

    # The environment transformers builds for apply_chat_template (chat_template_utils.py).
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string((TINY_QWEN3_INT4 / "chat_template.jinja").read_text())
    options = {"add_generation_prompt": True, **kwargs}
    ours = template.render(messages=messages, **options)

    tokenizer = AutoTokenizer.from_pretrained(TINY_QWEN3_INT4)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    assert ours == theirs
    if kwargs.get("enable_thinking") is False:
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Like Qwen3: reasoning of turns before the last user message is dropped, the reasoning of
    # the final answer is kept.
    assert "Tachycardia" not in ours
    if messages[-1].get("reasoning_content"):
        assert "<think>\nOrthostatic symptoms.\n</think>\n\nStand up slowly." in ours
    ids = tokenizer.encode(ours, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


@needs_export
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_large_model_layout_external_data_in_and_out(
    builder, checkpoint, tmp_path, monkeypatch, quant
):
    """A real model's fp32 export keeps its weights in model.onnx_data and the result must go
    to model.onnx + model.onnx.data; shrink the threshold so the tiny model takes that path."""
    import onnx

    from edged.export import export_model, optimum_export, quantize

    real_export = optimum_export.export_fp32

    def export_with_external_data(source: Path, workdir: Path) -> Path:
        graph = real_export(source, workdir)
        model = onnx.load(str(graph))
        onnx.save_model(model, str(graph), save_as_external_data=True, location="model.onnx_data")
        return graph

    monkeypatch.setattr(optimum_export, "export_fp32", export_with_external_data)
    monkeypatch.setattr(quantize, "EXTERNAL_DATA_ABOVE", 0)
    out = tmp_path / "model"
    export_model(builder.fixture_options(checkpoint, out, quant, progress=False))

    manifest = load_manifest(out)
    assert set(manifest.files) == {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
    }
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    assert manifest.verification["fp32_vs_transformers"]["tokens_equal"] is True
    tokens = _onnx_runner(out / "model.onnx").greedy([5, 17, 300], 4, eos=[])
    assert len(tokens) == 4
