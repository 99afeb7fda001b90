"""The weights' pages onnxruntime read once at load are given back, during the load and after it,
and nothing changes for it."""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.engine.residency import LoadPager, drop_clean_pages, mappings_of, page_out
from edged.engine.runner import lazy_zeros, release_positions
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


def _maps() -> str:
    return Path("/proc/self/maps").read_text()


@contextlib.contextmanager
def _one_cpu() -> Iterator[None]:
    """Run on one CPU (and so do threads started meanwhile): the kernel reclaims only pages on
    its LRU lists, a page just added to the cache waits in a per-CPU batch before it gets
    there, and madvise drains the calling CPU's batch, not another's."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _weights(path: Path, data: bytes) -> None:
    """A weights file as a model's is: written long ago, so clean and settled in the cache."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _paged_out(path: Path, timeout: float = 10.0) -> bool:
    """Page `path` out until little of it is resident, as the pager does every 10 ms: one
    call can find a page busy (locked by writeback, or not yet on the LRU) and leave it.
    Seen once in a clean clone's test run: the whole 1 MiB file stayed after one call."""
    deadline = time.monotonic() + timeout
    while True:
        assert page_out(mappings_of(path.resolve(), _maps()))
        if _resident_kb(path) < 100 or time.monotonic() > deadline:
            return _resident_kb(path) < 100
        time.sleep(0.01)


def test_page_out_reclaims_a_read_mapping_and_it_reads_back_the_same(tmp_path: Path) -> None:
    data = bytes(range(256)) * (4 << 10)  # 1 MiB
    path = tmp_path / "weights.data"
    with _one_cpu():
        _weights(path, data)
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
            assert view[:] == data and _resident_kb(path) >= 1000
            assert _paged_out(path)
            assert view[:] == data  # read again from the file


def test_page_out_never_loses_what_was_written(tmp_path: Path) -> None:
    """The pager acts on a snapshot of the mappings that may be stale: a range onnxruntime has
    unmapped may be the heap's by then. Reclaiming must keep what memory holds, as MADV_PAGEOUT
    does and MADV_DONTNEED (which hands back the file's bytes, or zeros) does not."""
    path = tmp_path / "scratch.data"
    path.write_bytes(bytes(1 << 20))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        view[0:4] = b"edge"
        assert page_out(mappings_of(path.resolve(), _maps()))
        assert view[0:4] == b"edge"


def test_the_load_pager_pages_out_while_it_runs_and_stops_after(tmp_path: Path) -> None:
    path = tmp_path / "weights.data"
    with _one_cpu():
        _weights(path, bytes(range(256)) * (16 << 10))  # 4 MiB
        _the_pager_runs(path)


def _the_pager_runs(path: Path) -> None:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
        with LoadPager([path], interval_s=0.01) as pager:
            _ = view[:]  # onnxruntime reading a tensor to repack it
            deadline = time.monotonic() + 10
            while _resident_kb(path) > 100 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _resident_kb(path) <= 100 and pager.passes >= 1
        assert not pager.running, "the pager stops with the load"
        _ = view[:]
        assert _resident_kb(path) >= 4000


def _resident_kb_of(buf: Any) -> int:
    """Resident kB of the pages under a numpy array's data (mincore). Not its mapping's Rss:
    the kernel merges neighbouring anonymous mappings, so the mapping may also hold the
    interpreter's own memory."""
    import ctypes

    page = mmap.PAGESIZE
    start = buf.ctypes.data - buf.ctypes.data % page
    pages = -(-(buf.ctypes.data + buf.nbytes - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(start, pages * page, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * page // 1024


_AFTER_A_LOAD = """
import ctypes, json, sys
import numpy as np
from tests.test_residency import _resident_kb_of
from edged.engine.runner import lazy_zeros

# The heap as a model load leaves it: once an mmapped block is freed, glibc serves blocks up to
# its size (at most 32 MiB) from the heap, and the heap holds freed memory with data in it.
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))
blocks = [libc.malloc(1 << 20) for _ in range(64)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
for b in blocks[:-1]:
    libc.free(b)
buf = lazy_zeros((1, 8, 1024, 128), np.float32)  # 4 MiB: a Qwen3 layer's keys, context 1024
before = _resident_kb_of(buf)
buf[0, :, :100, :] = 1.0  # 100 positions of each head: 400 KiB
print(json.dumps([before, _resident_kb_of(buf), bool(buf[0, :, 100:, :].any())]))
"""


def test_a_kv_buffer_is_resident_only_as_far_as_it_is_written() -> None:
    """The KV cache is sized for the whole context, and an answer writes a few hundred
    positions. np.zeros took such buffers from malloc's heap after a load, which zeroes reused
    memory by writing it: a context's worth was resident from the start (Qwen3-0.6B, context
    1024: 154 of 224 MB after a 320-token answer, which writes 72). In a process of its own,
    whose heap is left as a load leaves it."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _AFTER_A_LOAD], cwd=repo, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    before, written, stale = json.loads(out.stdout)
    assert before < 100 and written < 1000 and not stale, (before, written, stale)


def test_released_positions_give_their_pages_back_and_the_rest_stay() -> None:
    buf = lazy_zeros((1, 8, 1024, 128), np.float32)  # 512 bytes a position and head
    buf[0, :, :600, :] = 1.0
    assert 2300 < _resident_kb_of(buf) < 2500  # 8 heads x 600 positions
    released = release_positions(buf, 100)
    assert released >= 8 * 920 * 512  # each head's pages from position 104 (a page boundary) on
    assert 350 < _resident_kb_of(buf) < 450
    assert bool((buf[0, :, :100, :] == 1.0).all()) and not buf[0, :, 104:, :].any()
    heap = np.ones((1, 8, 64, 128), np.float32)  # not a private mapping: nothing to release
    assert release_positions(heap, 0) == 0 and bool((heap == 1.0).all())


@pytest.mark.arm64
def test_a_capped_answer_gives_back_what_longer_answers_wrote_beyond_the_cap() -> None:
    """The governor caps the context when memory is tight; the pages earlier answers wrote
    beyond the cap are released, and the capped answer is the same as on a fresh engine."""

    def load() -> Engine:
        return Engine.load(DEMO_MODEL, EngineOptions(threads=1, context_length=1024))

    def resident_kb(engine: Engine) -> int:
        return sum(_resident_kb_of(b) for b in engine._runner._buffers)  # type: ignore[union-attr]

    engine = load()
    engine.set_system_prompt("Answer as a careful nurse would.")
    prompt = engine.render_chat(
        [
            {"role": "system", "content": "Answer as a careful nurse would."},
            {"role": "user", "content": "My heart rate is 118 at rest. Should I worry?"},
        ],
        enable_thinking=False,
    )
    engine.generate(prompt, GenerationConfig(max_new_tokens=600, ignore_eos=True))
    long_kb = resident_kb(engine)
    capped = GenerationConfig(max_new_tokens=60, max_context=len(prompt) + 60)
    answer = engine.generate(prompt, capped)
    per_position = long_kb / (len(prompt) + 600)
    assert resident_kb(engine) < per_position * (len(prompt) + 60) + 64 < long_kb / 3
    assert answer.cached_tokens > 0
    assert answer.token_ids == load().generate(prompt, capped).token_ids
