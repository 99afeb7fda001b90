"""The README's fixture commands reproduce the committed fixtures byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _models import FIXTURES, REPO_ROOT, TINY_QWEN3_INT4, export_deps_missing, make_test_model

from edged.engine.manifest import read_manifest

GQA_FIXTURE = FIXTURES / "tiny-qwen3-gqa-int4"
SHARED_ASSETS = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
"""Files both fixtures copy from the one checkpoint make_test_model.build_checkpoint writes."""


def _differing(a: Path, b: Path) -> list[str]:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [
        n
        for n in names
        if not ((a / n).is_file() and (b / n).is_file())
        or (a / n).read_bytes() != (b / n).read_bytes()
    ]


def _regenerate(tool: str, out: Path, fixture: Path, timeout: float) -> None:
    """Run `python tools/<tool> --out OUT` as the README says; skip if the environment's
    exporters are not the ones the fixture was made with (then bytes may rightly differ)."""
    cmd = [sys.executable, str(REPO_ROOT / "tools" / tool), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made, committed = read_manifest(out).tools, read_manifest(fixture).tools
    if made != committed:
        pytest.skip(f"fixture made with {committed}, this environment has {made}")


def test_both_fixtures_carry_the_same_checkpoint_assets() -> None:
    # The GQA fixture once shipped an older tokenizer and template than the tiny model's.
    assert [
        n
        for n in SHARED_ASSETS
        if (GQA_FIXTURE / n).read_bytes() != (TINY_QWEN3_INT4 / n).read_bytes()
    ] == []


@pytest.mark.parametrize("fixture", [TINY_QWEN3_INT4, GQA_FIXTURE], ids=["tiny", "gqa"])
def test_no_committed_fixture_records_a_result_that_depends_on_the_cpu(fixture: Path) -> None:
    if export_deps_missing():
        pytest.skip(export_deps_missing())
    dependent = set(make_test_model().MACHINE_DEPENDENT)
    assert dependent & set(read_manifest(fixture).verification) == set()


@pytest.mark.export
def test_make_test_model_reproduces_the_bundled_tiny_model_byte_for_byte(tmp_path: Path) -> None:
    if export_deps_missing():
        pytest.skip(export_deps_missing())
    out = tmp_path / "tiny"

    _regenerate("make_test_model.py", out, TINY_QWEN3_INT4, timeout=300)

    assert _differing(out, TINY_QWEN3_INT4) == [], "regenerate: python tools/make_test_model.py"


@pytest.mark.export
def test_make_gqa_test_model_reproduces_its_fixture_byte_for_byte(tmp_path: Path) -> None:
    if export_deps_missing():
        pytest.skip(export_deps_missing())
    from edged.export import genai_builder

    if not (genai_builder.genai_venv_path() / "edged-venv.json").is_file():
        pytest.skip("the onnxruntime-genai venv is not built (about 90 s the first time)")
    out = tmp_path / "gqa"

    _regenerate("make_gqa_test_model.py", out, GQA_FIXTURE, timeout=600)

    assert _differing(out, GQA_FIXTURE) == [], "regenerate: python tools/make_gqa_test_model.py"
