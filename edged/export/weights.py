"""Read a checkpoint's safetensors one tensor (or a band of rows) at a time.

The streaming builder must never hold the whole model: transformers' loader and safetensors'
own mmap-backed reader both leave every touched page resident in the process, which is what a
memory limit counts. So the format (an 8-byte header length, a JSON header of dtype, shape and
byte offsets, then raw little-endian data) is read here with plain positioned reads, and each
tensor is converted to float32 only for the rows asked for.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .options import ExportError

_DTYPES: dict[str, tuple[np.dtype[Any], int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the tensor's data in `path`."""


class CheckpointWeights:
    """The tensors of a Hugging Face checkpoint directory's `*.safetensors` files, by name."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        files = sorted(checkpoint.glob("*.safetensors"))
        if not files:
            raise ExportError(
                f"{checkpoint}: no *.safetensors files; the streaming exporter reads safetensors "
                "only (use exporter 'optimum' for a pytorch_model.bin checkpoint)"
            )
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            self.entries.update(_read_header(path))

    def parameter_count(self) -> int:
        """Elements in all tensors: what the model weighs at a given dtype's width."""
        return sum(int(np.prod(e.shape, dtype=np.int64)) for e in self.entries.values())

    def tensor(self, name: str) -> np.ndarray:
        """The whole tensor as float32."""
        entry = self._entry(name)
        return self.rows(name, 0, entry.shape[0] if entry.shape else 1).reshape(entry.shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor's first axis, as float32."""
        entry = self._entry(name)
        dtype, size = _DTYPES[entry.dtype]
        row_items = int(np.prod(entry.shape[1:], dtype=np.int64)) if len(entry.shape) > 1 else 1
        count = (stop - start) * row_items
        with open(entry.path, "rb") as f:
            raw = os.pread(f.fileno(), count * size, entry.offset + start * row_items * size)
        if len(raw) != count * size:
            raise ExportError(f"{entry.path}: tensor {name!r} is truncated")
        data = np.frombuffer(raw, dtype=dtype)
        if entry.dtype == "BF16":
            # bfloat16 is the top half of a float32.
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32, copy=False).reshape((stop - start, *entry.shape[1:]))

    def row_bands(self, name: str, band: int) -> Iterator[np.ndarray]:
        """A 2-D tensor in bands of at most `band` rows, first to last."""
        total = self._entry(name).shape[0]
        for start in range(0, total, band):
            yield self.rows(name, start, min(start + band, total))

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise ExportError(
                f"{self.checkpoint}: the safetensors hold no tensor {name!r}"
            ) from None


def _read_header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ExportError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise ExportError(f"{path}: safetensors header of {length} bytes is implausible")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{path}: safetensors header is not JSON: {exc}") from exc
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ExportError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}; the streaming exporter "
                f"reads {', '.join(_DTYPES)}"
            )
        begin = int(info["data_offsets"][0])
        entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), 8 + length + begin)
    return entries


def write_safetensors(
    path: Path,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    data: Callable[[str], np.ndarray],
    dtype: str = "F32",
) -> None:
    """Write tensors into a safetensors file one at a time: the header (every name, shape and
    offset) first, then each tensor's bytes as `data(name)` returns them, so that only one
    tensor is ever in memory. `dtype` "BF16" rounds float32 to nearest even."""
    width = _DTYPES[dtype][1]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = width * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            array = np.ascontiguousarray(data(name), dtype="<f4")
            if array.shape != tuple(shape):
                raise ExportError(f"{name}: got shape {array.shape}, the header says {shape}")
            (to_bfloat16(array) if dtype == "BF16" else array).tofile(f)


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even, as torch rounds."""
    bits = array.astype("<f4", copy=False).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype("<u2")
