"""MatMulNBits / GatherBlockQuantized blocks (4 or 8 bits), made a band of rows at a time.

onnxruntime's own round-to-nearest kernels (`quantize_matmul_4bits` / `_8bits`, what its
MatMulNBitsQuantizer and onnxruntime-genai's builder call) do the arithmetic, so the bytes are
exactly those of the whole-model quantizers: symmetric, block 32 along K, one float scale per
block, the zero point implied (8 for 4 bits, 128 for 8). A weight stored as Hugging Face does,
[N out, K in], is quantized along its rows, so bands of rows are independent and nothing larger
than one band is ever converted to float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 32
"""The default block: one scale per 32 weights along K (onnxruntime-genai's and llama.cpp's)."""
BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)


def blob_bytes(bits: int, block: int = BLOCK_SIZE) -> int:
    """Bytes one block of `block` weights takes at `bits` bits each."""
    return block * bits // 8


@dataclass(frozen=True)
class BlockMatrix:
    packed: np.ndarray
    """uint8 [N, K / 32, 32 * bits / 8]: 4 bits two values a byte, low nibble first; 8 bits one."""
    scales: np.ndarray
    """float32 [N, K / 32]."""
    k: int
    bits: int = 4
    block: int = BLOCK_SIZE

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])


def quantize_band(
    band: np.ndarray, bits: int = 4, block: int = BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, K] of an [N, K] weight into (packed [n, blocks, block * bits / 8], scales)."""
    from onnxruntime.capi import _pybind_state as kernels

    if bits not in BITS:
        raise ValueError(f"bits = {bits} is not one of {BITS}")
    if block not in BLOCK_SIZES:
        raise ValueError(f"block = {block} is not one of {BLOCK_SIZES}")
    n, k = band.shape
    blocks = -(-k // block)
    # The kernel takes MatMul's [K, N] layout, padded to whole blocks along K.
    column_major = np.zeros((blocks * block, n), dtype=np.float32)
    column_major[:k] = band.T
    packed = np.zeros((n, blocks, blob_bytes(bits, block)), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), dtype=np.uint8)
    quantize = kernels.quantize_matmul_4bits if bits == 4 else kernels.quantize_matmul_8bits
    quantize(packed, column_major, scales, zero_points, block, n, k, True)
    return packed, scales


def quantize_rows(
    bands: Iterable[np.ndarray], bits: int = 4, block: int = BLOCK_SIZE
) -> BlockMatrix:
    """Quantize a matrix given as consecutive row bands (of one tensor or several stacked)."""
    packed, scales, k = [], [], None
    for band in bands:
        if k is not None and band.shape[1] != k:
            raise ValueError(f"band has {band.shape[1]} columns, the matrix {k}")
        k = int(band.shape[1])
        p, s = quantize_band(band, bits, block)
        packed.append(p)
        scales.append(s)
    if k is None:
        raise ValueError("no rows to quantize")
    return BlockMatrix(np.concatenate(packed), np.concatenate(scales), k, bits, block)


def dequantize(matrix: BlockMatrix) -> np.ndarray:
    """The float32 [N, K] weights the blocks stand for (for tests and checks)."""
    values: np.ndarray
    if matrix.bits == 8:
        values = matrix.packed.astype(np.int16) - 128
    else:
        low = (matrix.packed & 0x0F).astype(np.int8) - 8
        high = (matrix.packed >> 4).astype(np.int8) - 8
        values = np.stack([low, high], axis=-1).reshape(matrix.n, -1, matrix.block)
    return (values * matrix.scales[..., None]).reshape(matrix.n, -1)[:, : matrix.k]
