"""The prepacked-graph cache (edged.engine.prepacked): written at the first load, used at the
next, and never able to change an answer or stop a start.

Real onnxruntime sessions on the committed int4 fixtures (both graph layouts); the cache
directory is a temporary one, damaged on purpose where a test needs it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from _models import TINY_QWEN3_INT4

from edged.engine import Engine, EngineOptions, prepacked
from edged.engine.generate import GenerationConfig
from edged.engine.manifest import load_manifest

GQA = Path(__file__).parent / "fixtures" / "tiny-qwen3-gqa-int4"
GREEDY = GenerationConfig(max_new_tokens=24, ignore_eos=True)
PROMPT = [{"role": "user", "content": "My heart rate is 118 at rest. Should I worry?"}]


def _answer(model: Path, cache: Path | None) -> tuple[int, ...]:
    engine = Engine.load(model, EngineOptions(threads=1, context_length=256, prepacked_cache=cache))
    return engine.chat(PROMPT, GREEDY).token_ids


def _entry(model: Path, cache: Path) -> prepacked.CacheEntry:
    return prepacked.entry_for(cache, load_manifest(model))


@pytest.mark.arm64
@pytest.mark.parametrize("model", [TINY_QWEN3_INT4, GQA], ids=["optimum", "gqa"])
def test_first_load_writes_the_copy_and_the_next_uses_it_with_the_same_answer(
    model, tmp_path, caplog
):
    plain = _answer(model, None)
    cache = tmp_path / "prepacked"
    assert _answer(model, cache) == plain
    entry = _entry(model, cache)
    assert prepacked.check_copy(entry) is None

    caplog.set_level(logging.INFO, logger="edged.engine")
    assert _answer(model, cache) == plain
    assert f"prepacked copy {entry.directory}" in caplog.text
    assert [p.name for p in cache.iterdir()] == [entry.key]


@pytest.mark.parametrize("model", [TINY_QWEN3_INT4, GQA], ids=["optimum", "gqa"])
def test_the_copy_holds_onnxruntimes_prepacked_weights(model, tmp_path):
    import onnx  # the export extra's; the ARM check's runtime-only venv has no onnx

    cache = tmp_path / "prepacked"
    _answer(model, cache)
    # The copy's int4 weights carry onnxruntime's prepacked blobs (external data entries
    # `prepacked_N`), which is what lets it skip repacking them onto the heap.
    graph = onnx.load(str(_entry(model, cache).graph), load_external_data=False)
    packed = [
        t.name
        for t in graph.graph.initializer
        if any(e.key.startswith("prepacked_") for e in t.external_data)
    ]
    assert any(name.endswith("weight_Q4") or "MatMul" in name for name in packed), packed


@pytest.mark.arm64
@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate", "is missing or not"),
        ("probe", "probe logits differ"),
        ("stamp", "no readable"),
    ],
)
def test_a_damaged_copy_is_set_aside_and_the_original_answers(tmp_path, caplog, damage, reason):
    import numpy as np

    cache = tmp_path / "prepacked"
    plain = _answer(GQA, cache)
    entry = _entry(GQA, cache)
    if damage == "truncate":
        data = entry.directory / prepacked.DATA
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "probe":
        recorded = np.load(entry.directory / prepacked.PROBE)
        np.save(entry.directory / prepacked.PROBE, recorded + 1.0)
    else:
        (entry.directory / prepacked.STAMP).write_text("{")
    caplog.set_level(logging.WARNING, logger="edged.engine")
    assert _answer(GQA, cache) == plain
    assert "set aside" in caplog.text and reason in caplog.text
    # The original loaded, and wrote a fresh copy for the next start.
    assert prepacked.check_copy(entry) is None


def test_an_unwritable_cache_costs_the_copy_not_the_start(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    caplog.set_level(logging.WARNING, logger="edged")
    assert _answer(GQA, blocker / "prepacked") == _answer(GQA, None)
    assert "prepacked cache" in caplog.text


def test_no_copy_without_room(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(prepacked, "FREE_SPACE_FACTOR", 10**9)
    caplog.set_level(logging.WARNING, logger="edged.engine")
    cache = tmp_path / "prepacked"
    _answer(GQA, cache)
    assert "not writing a copy" in caplog.text
    assert list(cache.iterdir()) == []


def test_the_key_changes_with_the_model_the_runtime_and_the_cpu():
    manifest = load_manifest(GQA)
    key = prepacked.cache_key(manifest, "1.32.0", "x86_64 avx2 fma")
    assert key == prepacked.cache_key(manifest, "1.32.0", "x86_64 avx2 fma")
    other_files = dataclasses.replace(manifest, files={**manifest.files, "model.onnx": "0" * 64})
    assert (
        len(
            {
                key,
                prepacked.cache_key(manifest, "1.33.0", "x86_64 avx2 fma"),
                prepacked.cache_key(manifest, "1.32.0", "x86_64 avx2 fma avx512vnni"),
                prepacked.cache_key(other_files, "1.32.0", "x86_64 avx2 fma"),
            }
        )
        == 4
    )


def test_a_new_model_replaces_the_old_copy(tmp_path):
    cache = tmp_path / "prepacked"
    _answer(GQA, cache)
    _answer(TINY_QWEN3_INT4, cache)
    assert [p.name for p in cache.iterdir()] == [_entry(TINY_QWEN3_INT4, cache).key]


def test_the_daemons_backend_caches_under_the_state_dir_when_enabled(tmp_path):
    from edged.config.models import ModelConfig
    from edged.engine import load_backend

    on = ModelConfig(path=GQA, threads=1, context_length=256, prepacked_cache=True)
    load_backend(on, (), tmp_path / "state")
    assert prepacked.check_copy(_entry(GQA, tmp_path / "state" / "prepacked")) is None
    off = ModelConfig(path=GQA, threads=1, context_length=256)  # the default: off
    load_backend(off, (), tmp_path / "state-off")
    assert not (tmp_path / "state-off").exists()
