"""Drive one onnxruntime session step by step, owning its KV cache.

Both runners use IO binding so that the KV cache never round-trips through numpy between steps:
the growing runner feeds the previous step's present OrtValues straight back as past; the shared
runner binds one preallocated buffer per layer as both past and present, so decode allocates
nothing per token but the logits.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edged.engine.graph import GraphLayout


class ContextFullError(Exception):
    """The KV cache cannot hold more tokens."""

    def __init__(self, message: str, *, capped: bool = False) -> None:
        super().__init__(message)
        self.capped = capped
        """The limit was a per-request cap (GenerationConfig.max_context), not context_length:
        the same prompt may fit later."""


@dataclass(eq=False)
class KVSnapshot:
    """The KV cache after some prefix of tokens, reusable by later requests."""

    length: int
    values: tuple[object, ...] | None
    """Per past name: an OrtValue (growing runner) or a numpy array (shared runner). None while
    a shared runner's buffers hold these positions: it copies them out only before a step would
    write over them (`SharedKVRunner.snapshot`)."""


_SHRINK_ARENA = ort.RunOptions()
_SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


VERIFY_ROWS = 9
"""Rows of the reused verification buffer: the token and up to 8 drafts (DraftSettings.max_draft's
default). A longer pass gets its logits allocated by onnxruntime, as before."""


def lazy_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zeroed array whose pages become resident only when written: a private anonymous
    mapping of its own. np.zeros may instead take the memory from malloc's heap, which zeroes
    reused memory by writing it: the KV buffers of a whole context were then partly resident
    from the start, whatever the prompts (Qwen3-0.6B, context 1024: 154 of 224 MB resident
    after a 320-token answer, which writes 72)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)  # not on Windows
    if size == 0 or anonymous is None:
        return np.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | anonymous)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The private mapping under a `lazy_zeros` array; None for np.zeros's fallback."""
    base: object = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return base if isinstance(base, mmap.mmap) else None


def release_positions(buffer: np.ndarray, start: int) -> int:
    """Give the pages of a (batch 1, heads, positions, dim) `lazy_zeros` buffer that hold only
    positions from `start` on back to the kernel; the bytes of the ranges released. A released
    page reads as zeros and becomes resident again when a step writes it. Nothing is done for
    np.zeros's fallback or where there is no MADV_DONTNEED."""
    memory = _mapping_of(buffer)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if memory is None or advice is None:
        return 0
    _, heads, positions, dim = buffer.shape
    row = dim * buffer.itemsize
    page = mmap.PAGESIZE
    released = 0
    for head in range(heads):  # each head's positions are contiguous
        lo = -(-(head * positions + start) * row // page) * page  # rounded up to a page
        hi = (head + 1) * positions * row // page * page
        if hi > lo:
            memory.madvise(advice, lo, hi - lo)
            released += hi - lo
    return released


def _ortvalue(array: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(array)


class _RunnerBase:
    def __init__(self, session: ort.InferenceSession, layout: GraphLayout, capacity: int) -> None:
        self.session = session
        self.layout = layout
        self.capacity = capacity
        self.length = 0
        self._io = session.io_binding()
        # Slices of these are the attention mask and position ids of every step: no allocation.
        self._mask: np.ndarray = np.ones((1, capacity), dtype=layout.mask_dtype)
        self._positions = np.arange(capacity, dtype=np.int64)[None, :]

    def _run(self, n: int) -> None:
        """Run the bound step of `n` tokens; after a prompt chunk (n > 1), give the CPU arena's
        free regions back. A prompt's activations (attention grows with n^2) make onnxruntime's
        arena take a new region, which it keeps: the arena then follows the longest prompt the
        process has seen, and grows on as lengths vary and its free regions fragment (tiny
        model, 90 prompts of 10-400 tokens: RssAnon +5.3 MB from the first 30 to the last 30,
        against +1.1 MB and 10 MB lower with this; Qwen3-0.6B after eight prompts: 46 MB
        lower). Decode steps fit the arena's first region and run without it: freeing after
        every token costs a few percent of prefill speed, after a prompt chunk the cost is
        within noise (0.5 %)."""
        self.session.run_with_iobinding(self._io, _SHRINK_ARENA if n > 1 else None)

    def _check_room(self, n: int) -> None:
        if n <= 0:
            raise ValueError("forward() needs at least one token")
        if self.length + n > self.capacity:
            raise ContextFullError(
                f"context holds {self.length} tokens; {n} more exceed context_length = "
                f"{self.capacity}"
            )

    def _bind_step_inputs(self, ids: Sequence[int]) -> None:
        n = len(ids)
        io, layout = self._io, self.layout
        io.bind_cpu_input("input_ids", np.asarray(ids, dtype=layout.ids_dtype).reshape(1, n))
        io.bind_cpu_input("attention_mask", self._mask[:, : self.length + n])
        if layout.has_position_ids:
            io.bind_cpu_input("position_ids", self._positions[:, self.length : self.length + n])

    @staticmethod
    def _last_logits(value: ort.OrtValue) -> np.ndarray:
        logits = value.numpy()
        return np.asarray(logits[0, -1], dtype=np.float32)


class GrowingKVRunner(_RunnerBase):
    """Graphs whose present is past plus the new positions (optimum layout)."""

    def __init__(self, session: ort.InferenceSession, layout: GraphLayout, capacity: int) -> None:
        super().__init__(session, layout, capacity)
        shape = (1, layout.kv_heads, 0, layout.head_dim)
        self._empty = _ortvalue(np.zeros(shape, dtype=layout.kv_dtype))
        self._past: list[ort.OrtValue] = []
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self._past = [self._empty] * len(self.layout.past_names)

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        self._check_room(len(ids))
        io, layout = self._io, self.layout
        self._bind_step_inputs(ids)
        for name, value in zip(layout.past_names, self._past, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output(layout.logits_name, "cpu")
        for name in layout.present_names:
            io.bind_output(name, "cpu")
        self._run(len(ids))
        outputs = io.get_outputs()
        self._past = list(outputs[1:])
        self.length += len(ids)
        return self._last_logits(outputs[0])

    def snapshot(self) -> KVSnapshot:
        # A copy, not the present OrtValues themselves: before onnxruntime 1.30 the values that
        # IOBinding.get_outputs() returns are the binding's own output slots, which the next run
        # replaces, so a shared snapshot silently became a later, longer cache. Taken once per
        # system prompt, the copy costs nothing per request.
        return KVSnapshot(self.length, tuple(_ortvalue(value.numpy()) for value in self._past))

    def restore(self, snapshot: KVSnapshot) -> None:
        assert snapshot.values is not None  # this runner's snapshots are always copies
        self.length = snapshot.length
        self._past = list(snapshot.values)  # type: ignore[arg-type]


class SharedKVRunner(_RunnerBase):
    """GroupQueryAttention graphs with one in-place past/present buffer per layer."""

    def __init__(self, session: ort.InferenceSession, layout: GraphLayout, capacity: int) -> None:
        super().__init__(session, layout, capacity)
        shape = (1, layout.kv_heads, capacity, layout.head_dim)
        self._buffers: list[np.ndarray] = [
            lazy_zeros(shape, layout.kv_dtype) for _ in layout.past_names
        ]
        self._values = [_ortvalue(buf) for buf in self._buffers]
        logits_info = next(o for o in session.get_outputs() if o.name == layout.logits_name)
        vocab = logits_info.shape[-1]
        # The decode step's logits go to one reused buffer when the vocabulary size is static,
        # and so do a verification pass's: its first n rows, bound as an OrtValue per n (a view,
        # made once). Letting onnxruntime allocate them and copying them out cost about 33 us
        # a pass, a tenth of a step on the demo model: its end-to-end speculation speedup
        # read 1.26-1.34 before and 1.35-1.40 after (three alternating pairs of processes).
        self._step_logits: np.ndarray | None = None
        self._rows_logits: np.ndarray | None = None
        self._rows_values: dict[int, ort.OrtValue] = {}
        if isinstance(vocab, int) and logits_info.type == "tensor(float)":
            self._step_logits = np.zeros((1, 1, vocab), dtype=np.float32)
            self._step_logits_value = _ortvalue(self._step_logits)
            self._rows_logits = np.zeros((1, VERIFY_ROWS, vocab), dtype=np.float32)
        for past, present, value in zip(
            layout.past_names, layout.present_names, self._values, strict=True
        ):
            self._io.bind_ortvalue_input(past, value)
            self._io.bind_ortvalue_output(present, value)
        # `logits_to_keep` has a default in the graph (an initializer), which IO binding takes
        # only as an OrtValue; one per count, made once (each keeps its array alive).
        self._keep: dict[int, ort.OrtValue] = {}
        if layout.logits_keep_input is not None:
            self._bind_keep(1)
        # The snapshot whose positions the buffers hold (see `snapshot`); weak, so that a
        # prefix the engine replaced is never copied out.
        self._resident: weakref.ref[KVSnapshot] | None = None

    def reset(self) -> None:
        # Stale positions beyond `length` are never read: the mask bounds attention. The
        # resident snapshot's positions stay valid until a step writes over them.
        self.length = 0

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        self._check_room(len(ids))
        self._before_write()
        io = self._io
        self._bind_step_inputs(ids)
        step_buffer = self._step_logits if len(ids) == 1 else None
        if step_buffer is not None:
            io.bind_ortvalue_output(self.layout.logits_name, self._step_logits_value)
        else:
            io.bind_output(self.layout.logits_name, "cpu")
        self._run(len(ids))
        self.length += len(ids)
        if step_buffer is not None:
            # A view, not a copy: the caller picks the next token before the next forward.
            return step_buffer[0, -1]
        # Presents were bound first, logits last: a rebinding keeps its place.
        return self._last_logits(io.get_outputs()[-1])

    @property
    def can_verify(self) -> bool:
        """Whether `verify` can return logits for several positions: the graph has the
        `logits_to_keep` input, or returns logits for every position."""
        return self.layout.logits_keep_input is not None or not self.layout.logits_last_only

    def verify(self, ids: Sequence[int]) -> np.ndarray:
        """Run `ids` in one pass and return the logits after each of them, shape (len(ids),
        vocab): row i predicts the token that follows ids[: i + 1]. Speculative decoding
        checks drafted tokens with it; `rewind` then drops the ones the model did not accept.
        Up to VERIFY_ROWS rows are a view of a reused buffer, valid until the next `verify`."""
        n = len(ids)
        self._check_room(n)
        keep = self.layout.logits_keep_input
        if keep is None and self.layout.logits_last_only:
            raise ValueError("this graph returns logits for the last position only")
        self._before_write()
        io = self._io
        self._bind_step_inputs(ids)
        if keep is not None:
            self._bind_keep(n)
        rows = self._rows_value(n)
        if rows is not None:
            io.bind_ortvalue_output(self.layout.logits_name, rows)
        else:
            io.bind_output(self.layout.logits_name, "cpu")
        self.session.run_with_iobinding(io)
        if keep is not None:
            self._bind_keep(1)  # plain steps and prefill: the last position
        self.length += n
        if rows is not None and self._rows_logits is not None:
            return self._rows_logits[0, :n]
        logits = io.get_outputs()[-1].numpy()
        return np.asarray(logits[0, -n:], dtype=np.float32)

    def _rows_value(self, n: int) -> ort.OrtValue | None:
        """The OrtValue over the first `n` rows of the verification buffer (None: no buffer, or
        more rows than it holds; onnxruntime then allocates)."""
        if self._rows_logits is None or n > self._rows_logits.shape[1]:
            return None
        value = self._rows_values.get(n)
        if value is None:
            value = self._rows_values[n] = _ortvalue(self._rows_logits[:, :n])
        return value

    def batch_differences(
        self, prompt: Sequence[int], tokens: Sequence[int], chunk: int
    ) -> list[float]:
        """After `prompt`, the largest logit difference at each of `tokens` between one
        verification pass and one step at a time, relative to the step's largest logit (the
        cache is reset after)."""
        self.reset()
        for start in range(0, len(prompt), chunk):
            self.forward(prompt[start : start + chunk])
        base = self.length
        batch = np.array(self.verify(tokens), copy=True)
        self.rewind(base)
        diffs = []
        for t, row in zip(tokens, batch, strict=True):
            step = self.forward([t])
            diffs.append(float(np.max(np.abs(step - row)) / max(1.0, float(np.max(np.abs(step))))))
        self.reset()
        return diffs

    def _bind_keep(self, n: int) -> None:
        value = self._keep.get(n)
        if value is None:
            value = self._keep[n] = _ortvalue(np.array([n], dtype=np.int64))
        assert self.layout.logits_keep_input is not None
        self._io.bind_ortvalue_input(self.layout.logits_keep_input, value)

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (drafted tokens the model rejected). The
        buffers keep their stale values: the mask bounds attention, and the next step writes
        over them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rewind to {length}: the cache holds {self.length} positions")
        self.length = length

    def snapshot(self) -> KVSnapshot:
        """The cache as it is, without a copy: the buffers hold it. A step writes only at and
        beyond `length`, so the snapshot's positions stay intact while every prompt starts
        with it (the daemon's system prompt), and are copied out only before a step would
        write over them. A second copy of the system prompt's KV had stayed resident for the
        daemon's lifetime (Qwen3-1.7B, fp32 KV: 224 kB a token, 43 MB for the benchmark's
        194-token system prompt)."""
        self._save_resident()
        snap = KVSnapshot(self.length, None)
        self._resident = weakref.ref(snap)
        return snap

    def restore(self, snapshot: KVSnapshot) -> None:
        n = snapshot.length
        if self._held() is not snapshot:
            self._save_resident()
            assert snapshot.values is not None  # a snapshot not held is always saved
            for buf, saved in zip(self._buffers, snapshot.values, strict=True):
                buf[:, :, :n, :] = saved  # type: ignore[index]
            # The buffers hold it again: drop the copy, made again if a prompt diverges.
            snapshot.values = None
            self._resident = weakref.ref(snapshot)
        self.length = n

    def release(self, keep: int) -> int:
        """Give the memory of every position from `keep` on back to the kernel; the bytes of
        the ranges released. What the cache holds stays: the positions below `length`, and the
        resident prefix's. The buffers are sized for the whole context but resident only as
        far as written, so without this one long answer kept its pages for the process's
        life, and the governor's context cap under tight memory (GenerationConfig.max_context)
        bounded what later answers wrote but freed nothing."""
        held = self._held()
        start = max(keep, self.length, held.length if held is not None else 0)
        if start >= self.capacity:
            return 0
        return sum(release_positions(buf, start) for buf in self._buffers)

    def _held(self) -> KVSnapshot | None:
        return self._resident() if self._resident is not None else None

    def _save_resident(self) -> None:
        """Copy the resident snapshot's positions out of the buffers (it stays valid, restored
        by copying back) and stop holding it."""
        held = self._held()
        if held is not None and held.values is None:
            n = held.length
            held.values = tuple(buf[:, :, :n, :].copy() for buf in self._buffers)
        self._resident = None

    def _before_write(self) -> None:
        """Before a step writes at `length`: save the resident snapshot if the write lands on
        its positions."""
        held = self._held()
        if held is not None and self.length < held.length:
            self._save_resident()


def make_runner(
    session: ort.InferenceSession, layout: GraphLayout, capacity: int
) -> GrowingKVRunner | SharedKVRunner:
    if layout.shared_kv_buffer:
        return SharedKVRunner(session, layout, capacity)
    return GrowingKVRunner(session, layout, capacity)
