"""`edged model export --int4-algorithm`: every algorithm stores the same MatMulNBits int4 graph
(the engine runs it unchanged), says in the manifest how its weights were chosen, and refuses
what it cannot do with a message naming the option. What each costs in quality is measured by
tools/quality_table.py on the demo model (README, "int4 quality")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _models import export_deps_missing, make_test_model

from edged.engine.manifest import load_manifest
from edged.eval.datasets import DATA_DIR
from edged.export import ExportError, ExportOptions

CALIBRATION = DATA_DIR / "calibration.jsonl"

pytestmark = [
    pytest.mark.export,
    pytest.mark.skipif(export_deps_missing() is not None, reason=str(export_deps_missing())),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model().build_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.mark.parametrize(
    ("algorithm", "symmetric"),
    [("rtn-asym", False), ("hqq", False), ("kquant", False), ("gptq", True)],
)
def test_each_algorithm_exports_a_runnable_int4_graph_and_says_so(
    checkpoint: Path, tmp_path: Path, algorithm: str, symmetric: bool
) -> None:
    import onnx

    from edged.engine import Engine, EngineOptions, GenerationConfig
    from edged.export import export_model

    out = tmp_path / algorithm
    export_model(
        ExportOptions(
            source=str(checkpoint),
            output=out,
            int4_algorithm=algorithm,
            calibration=CALIBRATION,
            progress=False,
        )
    )
    graph = onnx.load(str(out / "model.onnx")).graph
    constants = {i.name for i in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    levels = {
        onnx.helper.get_attribute_value(a)
        for n in nbits
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert len(nbits) == 2 * 7 + 1 and levels == {4}  # every linear and the LM head, int8 compute
    assert any(n.op_type == "GatherBlockQuantized" for n in graph.node)
    manifest = load_manifest(out, verify=True)
    assert manifest.quantization.algorithm == algorithm
    assert manifest.quantization.symmetric is symmetric
    assert 0.2 < manifest.verification["top1_agreement_vs_fp32"] <= 1.0
    engine = Engine.load(out, EngineOptions(threads=1))
    result = engine.chat([{"role": "user", "content": "hello"}], GenerationConfig(max_new_tokens=4))
    assert result.completion_tokens == 4


def test_the_default_algorithm_is_not_written_into_the_manifest() -> None:
    from edged.engine.manifest import read_manifest
    from edged.models import TINY_QWEN3_INT4

    manifest = read_manifest(TINY_QWEN3_INT4)
    assert manifest.quantization.algorithm is None
    assert (
        "algorithm"
        not in json.loads((TINY_QWEN3_INT4 / "edged-model.json").read_text())["quantization"]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"int4_algorithm": "awq"}, "int4_algorithm = 'awq' is not one of rtn, rtn-asym"),
        ({"int4_algorithm": "gptq"}, "int4_algorithm = 'gptq' needs calibration"),
        ({"int4_algorithm": "hqq", "quant": "int8"}, "needs quant = 'int4', not 'int8'"),
        (
            {"int4_algorithm": "hqq", "exporter": "ort-genai"},
            "int4_algorithm = 'hqq' is for exporter 'optimum'",
        ),
    ],
)
def test_bad_algorithm_options_are_refused_by_name(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        ExportOptions(source="ckpt", output=Path("out"), **options)  # type: ignore[arg-type]


def test_bad_calibration_rows_are_refused_naming_file_and_line(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from edged.export.calibration import calibration_texts
    from edged.models import TINY_QWEN3_INT4

    tokenizer = AutoTokenizer.from_pretrained(TINY_QWEN3_INT4)
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "fine"}\n{"prompt": "no messages"}\n')
    with pytest.raises(ExportError, match=r"calib.jsonl:2: calibration rows need messages or text"):
        calibration_texts(path, tokenizer)
    path.write_text("{not json\n")
    with pytest.raises(ExportError, match=r"calib.jsonl:1: calibration row is not JSON"):
        calibration_texts(path, tokenizer)
    with pytest.raises(ExportError, match="cannot read"):
        calibration_texts(tmp_path / "missing.jsonl", tokenizer)
