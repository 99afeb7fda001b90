"""The weights' pages onnxruntime read once at load are given back, and nothing changes for it."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.engine.residency import drop_clean_pages, mappings_of
from edged.models import DEMO_MODEL

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")


def _resident_kb(path: Path) -> int:
    return sum(m.rss_kb for m in mappings_of(path.resolve(), Path("/proc/self/smaps").read_text()))


def test_clean_pages_of_a_read_mapping_are_dropped_and_read_back_the_same(tmp_path: Path) -> None:
    data = bytes(range(256)) * (4 << 10)  # 1 MiB
    path = tmp_path / "weights.data"
    path.write_bytes(data)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
        assert view[:] == data
        assert _resident_kb(path) >= 1000
        dropped = drop_clean_pages(path)
        assert dropped >= 1000 and _resident_kb(path) == 0
        assert view[:] == data  # faulted back in from the file


def test_a_written_mapping_is_left_alone(tmp_path: Path) -> None:
    """A private page someone wrote exists nowhere else: dropping it would lose the write."""
    path = tmp_path / "scratch.data"
    path.write_bytes(bytes(1 << 20))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        view[0:4] = b"edge"
        _ = view[:]
        assert drop_clean_pages(path) == 0
        assert view[0:4] == b"edge"


def test_a_loaded_engine_keeps_little_of_its_weights_file_resident() -> None:
    """After load the engine holds its repacked weights on the heap; of the data file it
    keeps the pages the embedding lookup touches, not the file onnxruntime read to repack."""
    data = DEMO_MODEL / "model.onnx.data"
    engine = Engine.load(DEMO_MODEL, EngineOptions(threads=1, context_length=256))
    assert _resident_kb(data) * 1024 < data.stat().st_size // 4
    prompt = engine.render_chat([{"role": "user", "content": "My SpO2 is 91 %. Is that low?"}])
    first = engine.generate(prompt, GenerationConfig(max_new_tokens=24))
    again = engine.generate(prompt, GenerationConfig(max_new_tokens=24))
    assert first.completion_tokens > 0 and first.token_ids == again.token_ids
