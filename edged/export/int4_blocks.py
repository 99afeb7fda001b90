"""int4 blocks for MatMulNBits / GatherBlockQuantized, made a band of rows at a time.

onnxruntime's own round-to-nearest kernel (`quantize_matmul_4bits`, what its
MatMulNBitsQuantizer and onnxruntime-genai's builder call) does the arithmetic, so the bytes are
exactly those of the whole-model quantizers: symmetric, block 32 along K, one float scale per
block, the zero point implied (8). A weight stored as Hugging Face does, [N out, K in], is
quantized along its rows, so bands of rows are independent and nothing larger than one band
is ever converted to float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 32
BLOB_BYTES = BLOCK_SIZE // 2


@dataclass(frozen=True)
class Int4Matrix:
    packed: np.ndarray
    """uint8 [N, K / 32, 16]: two 4-bit values per byte, low nibble first."""
    scales: np.ndarray
    """float32 [N, K / 32]."""
    k: int

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])


def quantize_band(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, K] of an [N, K] weight into (packed [n, blocks, 16], scales [n, blocks])."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = band.shape
    blocks = -(-k // BLOCK_SIZE)
    # The kernel takes MatMul's [K, N] layout, padded to whole blocks along K.
    column_major = np.zeros((blocks * BLOCK_SIZE, n), dtype=np.float32)
    column_major[:k] = band.T
    packed = np.zeros((n, blocks, BLOB_BYTES), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, column_major, scales, zero_points, BLOCK_SIZE, n, k, True)
    return packed, scales


def quantize_rows(bands: Iterable[np.ndarray]) -> Int4Matrix:
    """Quantize a matrix given as consecutive row bands (of one tensor or several stacked)."""
    packed, scales, k = [], [], None
    for band in bands:
        if k is not None and band.shape[1] != k:
            raise ValueError(f"band has {band.shape[1]} columns, the matrix {k}")
        k = int(band.shape[1])
        p, s = quantize_band(band)
        packed.append(p)
        scales.append(s)
    if k is None:
        raise ValueError("no rows to quantize")
    return Int4Matrix(np.concatenate(packed), np.concatenate(scales), k)


def dequantize(matrix: Int4Matrix) -> np.ndarray:
    """The float32 [N, K] weights the blocks stand for (for tests and checks)."""
    low = (matrix.packed & 0x0F).astype(np.int8) - 8
    high = (matrix.packed >> 4).astype(np.int8) - 8
    values = np.stack([low, high], axis=-1).reshape(matrix.n, -1, BLOCK_SIZE)
    return (values * matrix.scales[..., None]).reshape(matrix.n, -1)[:, : matrix.k]
