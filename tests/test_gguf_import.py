"""GGUF in: `edged model export FILE.gguf OUT` on GGUF files written here (tools/make_gguf.py, and
llama.cpp's own Q4_K_M in tests/fixtures)
from the committed demo checkpoint, and clear refusals of what cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.engine import Engine, EngineOptions
from edged.export.options import ExportError
from edged.models import DEMO_MODEL as DEMO_MODEL_DIR
from tests._models import REPO_ROOT, export_deps_missing, heldout_agreement, load_tool

DEMO_HF = REPO_ROOT / "tests" / "fixtures" / "demo-clinical-hf"
Q4_K_M = REPO_ROOT / "tests" / "fixtures" / "demo-clinical-q4_k_m.gguf"

pytestmark = [
    pytest.mark.export,
    pytest.mark.skipif(export_deps_missing() is not None, reason=str(export_deps_missing())),
]


def _edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "demo-q8_0.gguf"
    return load_tool("make_gguf").write_gguf(DEMO_HF, out, "Q8_0")


def test_the_gguf_reader_rebuilds_the_checkpoint_and_its_tokenizer(
    q8_gguf: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edged.export.gguf_import import gguf_to_checkpoint

    summary = gguf_to_checkpoint(q8_gguf, tmp_path / "hf")
    assert summary.architecture == "qwen3" and set(summary.tensor_types) == {"Q8_0", "F32"}
    ours, theirs = (
        AutoTokenizer.from_pretrained(tmp_path / "hf"),
        AutoTokenizer.from_pretrained(DEMO_HF),
    )
    chat = [{"role": "user", "content": "SpO2 89 % now, lowest 86 %. Should I worry? 😟"}]
    text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    ids = theirs(text, return_tensors="pt")
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(**ids)
        b = AutoModelForCausalLM.from_pretrained(DEMO_HF, dtype=torch.float32)(**ids)
    # Q8_0: one byte per weight, block scales: the same next token everywhere.
    assert bool((a.logits.argmax(-1) == b.logits.argmax(-1)).all())


@pytest.mark.parametrize(
    ("tokenizer_from", "pre", "embedded"),
    [
        (DEMO_HF, "gpt-2", True),
        (REPO_ROOT / "edged" / "models" / "tiny-qwen3-int4", "qwen2", False),
    ],
)
def test_the_tokenizer_comes_back_from_the_gguf_splitting_as_it_did(
    tokenizer_from: Path, pre: str, embedded: bool, tmp_path: Path
) -> None:
    """llama.cpp applies a pre-tokenizer by the name the GGUF gives it. Qwen's split (the tiny
    fixture: one token per digit) has a name and is rebuilt from it; the demo model's (whole
    numbers, decimals too) has none, so its tokenizer.json travels in the GGUF and is read back.
    Either way the tokenizer out splits the vitals block into the same ids as the one in."""
    import shutil

    import gguf
    from transformers import AutoTokenizer

    from edged.export.gguf_import import gguf_to_checkpoint

    source = tmp_path / "source"
    shutil.copytree(DEMO_HF, source)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, source / name)
    path = load_tool("make_gguf").write_gguf(source, tmp_path / "m.gguf", "F16")
    fields = gguf.GGUFReader(str(path)).fields
    field = fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == pre
    assert (gguf.Keys.Tokenizer.HF_JSON in fields) is embedded
    gguf_to_checkpoint(path, tmp_path / "hf")
    ours, theirs = (AutoTokenizer.from_pretrained(d) for d in (tmp_path / "hf", source))
    text = "- heart rate: 104 /min now, range 98–112 /min\n- temperature: 38.2 °C. NEWS2 8"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    whole = {"Ġ104", "Ġ38.2"} <= set(theirs.tokenize(text))
    assert whole is embedded  # one token per reading, or one per digit


def test_export_and_eval_run_end_to_end_on_a_gguf(q8_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-gguf"
    done = _edged("model", "export", str(q8_gguf), str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "edged-model.json").read_text())
    assert manifest["verification"]["gguf"]["tensor_types"]["Q8_0"] > 0
    # The default exporter (stream) records its int4 graph's agreement with transformers on the
    # checkpoint rebuilt from the GGUF.
    assert manifest["exporter"] == "stream"
    agreement = manifest["verification"]["top1_agreement_vs_transformers"]
    # Next tokens of the edged int4 model (from the Q8_0 GGUF) against the original bf16
    # checkpoint's, teacher-forced on held-out answers: as close as the int4 export of the
    # original itself (the GGUF's Q8_0 rounding costs next to nothing on top).
    from_gguf = heldout_agreement(out, DEMO_HF)
    direct = heldout_agreement(DEMO_MODEL_DIR, DEMO_HF)
    assert 0.0 < agreement <= 1.0
    assert from_gguf >= direct - 0.02, (from_gguf, direct)
    report = tmp_path / "eval.json"
    done = _edged("model", "eval", str(out), "--limit", "5", "--json", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["perplexity"]["value"] < 3 and result["mcq"]["items"] == 5


def test_llama_cpp_k_quants_dequantize_to_the_original_weights(tmp_path: Path) -> None:
    """A Q4_K_M made by llama.cpp's own quantizer (tests/fixtures/README.md): Q4_K and Q6_K
    blocks come back within their rounding of the bf16 weights, and the model predicts what
    the original does."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edged.eval.datasets import DEFAULT_FILES, load
    from edged.eval.harness import split_chat
    from edged.export.gguf_import import gguf_to_checkpoint

    summary = gguf_to_checkpoint(Q4_K_M, tmp_path / "hf")
    assert summary.tensor_types == {"F32": 25, "Q4_K": 38, "Q6_K": 5}
    ours = load_file(str(next((tmp_path / "hf").glob("*.safetensors"))))
    original = load_file(str(DEMO_HF / "model.safetensors"))
    assert set(ours) == set(original)
    for name, weight in original.items():
        error = float((ours[name].float() - weight.float()).norm() / weight.float().norm())
        if "norm" in name:
            assert error == 0.0, name  # F32 in the file: exact
        else:  # 4.5 and 6.6 bits a weight: a few per cent of the tensor's norm
            assert error < (0.025 if name == "model.embed_tokens.weight" else 0.09), (name, error)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(DEMO_HF, dtype=torch.float32).eval()
    engine = Engine.load(DEMO_MODEL_DIR, EngineOptions(threads=1))
    agree = total = 0
    for row in load([DEFAULT_FILES[0]])[:4]:
        prompt, target = split_chat(engine, row.data["messages"])
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            agree += int((a(ids).logits.argmax(-1) == b(ids).logits.argmax(-1)).sum())
        total += ids.shape[1]
    assert agree / total > 0.95, agree / total


def _writer(path: Path, arch: str = "qwen3") -> object:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    return writer


def _finish(writer: object) -> None:
    writer.write_header_to_file()  # type: ignore[attr-defined]
    writer.write_kv_data_to_file()  # type: ignore[attr-defined]
    writer.write_tensors_to_file()  # type: ignore[attr-defined]
    writer.close()  # type: ignore[attr-defined]


def test_an_unsupported_tensor_type_is_refused_by_name(tmp_path: Path) -> None:
    import gguf

    from edged.export.gguf_import import gguf_to_checkpoint

    path = tmp_path / "iq.gguf"
    writer = _writer(path)
    qtype = gguf.GGMLQuantizationType.IQ4_NL
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((32, 256 // block * size), dtype=np.uint8)  # 32 rows of 256 weights
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)  # type: ignore[attr-defined]
    _finish(writer)
    with pytest.raises(ExportError, match=r"blk\.0\.attn_q\.weight is IQ4_NL.*supported: F32"):
        gguf_to_checkpoint(path, tmp_path / "hf")
    done = _edged("model", "export", str(path), str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 1 and "IQ4_NL" in done.stderr


def test_an_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from edged.export.gguf_import import gguf_to_checkpoint

    path = tmp_path / "llama.gguf"
    writer = _writer(path, "llama")
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, np.float32))  # type: ignore[attr-defined]
    _finish(writer)
    with pytest.raises(ExportError, match="architecture 'llama' is not supported"):
        gguf_to_checkpoint(path, tmp_path / "hf")


def test_a_directory_with_two_ggufs_asks_which(tmp_path: Path) -> None:
    from edged.export.gguf_import import find_gguf

    (tmp_path / "a.gguf").write_bytes(b"")
    assert find_gguf(str(tmp_path)) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ExportError, match="holds 2 GGUF files"):
        find_gguf(str(tmp_path))
    assert find_gguf(str(DEMO_HF)) is None
