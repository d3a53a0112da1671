"""GGUF quantized blocks -> the grouped layouts the kernels read (kernels/weight_quant.py), value for value.

Each block type is decoded as gguf.quants dequantizes it, stopping short of the final multiply: what is left is an
integer q per value and one fp32 (scale, min) pair per group along K such that q * scale + min is the very fp32
value gguf's reference computes (the same products, rounded in the same order: every q * scale below is exact in
fp32 except Q6_K's, which gguf rounds the same way).

  Q4_0  d * (q - 8)             -> int4, group 32: scale d, min -8d (d * q and 8d are exact, so is their sum)
  Q4_1  d * q + m               -> int4, group 32: scale d, min m
  Q4_K  d sc_j * q - dmin m_j   -> int4, group 32 (the 8 sub-blocks of a 256-value super-block)
  Q5_K  the same with 5-bit q   -> int8_group, group 32
  Q6_K  d sc_j * (q - 32)       -> int8_group, group 16: q - 32 as int8, scale d sc_j, min 0
  Q8_0  d * q                   -> int8_group, group 32: scale d, min 0

Any other type (F16, F32, BF16, Q2_K, Q3_K, IQ*, ...) has no entry: the compiler dequantizes it instead and says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kernels.weight_quant import pack_int4

QK_K = 256
Packed = tuple[str, torch.Tensor, torch.Tensor]  # (scheme, w, scale [N, K / G, 2] fp32) as kernels/weight_quant.py


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] fp32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """[n, m * width / 2] uint8 -> [n, m * width] uint8: each run of width / 2 bytes gives width values, low nibbles
    first, then high nibbles (the order of every 4-bit GGUF block)."""
    n = qs.shape[0]
    pairs = qs.reshape(n, -1, 1, width // 2) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (pairs & np.uint8(0x0F)).reshape(n, -1)


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:], 32), d, -8 * d, 32


def _q4_1(b: np.ndarray):
    return _nibbles(b[:, 4:], 32), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_K / Q5_K super-block's header -> (scale, min) of its 8 sub-blocks, [n, 8] fp32 each (gguf.quants.Q4_K:
    d * sc and dmin * m, both products exact in fp32)."""
    import gguf

    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return d * sc.astype(np.float32), dmin * m.astype(np.float32)


def _q4_k(b: np.ndarray):
    scale, dm = _k_scales(b)
    return _nibbles(b[:, 16:], 64), scale, -dm, 32


def _q5_k(b: np.ndarray):
    n = b.shape[0]
    scale, dm = _k_scales(b)
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = _nibbles(b[:, 48:], 64) | ((qh & np.uint8(1)).reshape(n, -1) << np.uint8(4))
    return q.astype(np.int8), scale, -dm, 32


def _q6_k(b: np.ndarray):
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 128)
    qh = b[:, 128:192].reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (ql | ((qh & np.uint8(3)).reshape(n, -1) << np.uint8(4))).astype(np.int8) - np.int8(32)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    return q, scale, np.zeros_like(scale), 16


def _q8_0(b: np.ndarray):
    d = _f16(b[:, :2])
    return b[:, 2:].view(np.int8), d, np.zeros_like(d), 32


# GGUF type name -> (scheme, block bytes, block values, decoder of [n blocks, block bytes] u8 -> q [n, values],
# scale and min [n, groups per block], group size)
_BLOCKS: dict[str, tuple[str, int, int, Callable]] = {
    "Q4_0": ("int4", 18, 32, _q4_0), "Q4_1": ("int4", 20, 32, _q4_1), "Q4_K": ("int4", 144, QK_K, _q4_k),
    "Q5_K": ("int8_group", 176, QK_K, _q5_k), "Q6_K": ("int8_group", 210, QK_K, _q6_k),
    "Q8_0": ("int8_group", 34, 32, _q8_0),
}
NATIVE_TYPES = tuple(_BLOCKS)


def repack(type_name: str, data: np.ndarray, rows: int, cols: int) -> Packed:
    """A GGUF tensor's raw blocks (data: [rows, bytes per row] uint8, row-major as the reader gives them) ->
    (scheme, w, scale): int4 w [rows, cols / 2] uint8 packed, or int8_group w [rows, cols] int8; scale
    [rows, cols / G, 2] fp32 (scale, min). KeyError for a type not in NATIVE_TYPES."""
    scheme, nbytes, values, decode = _BLOCKS[type_name]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows * (cols // values), nbytes)
    q, scale, low, group = decode(blocks)
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols).copy())
    pairs = np.stack([scale.reshape(rows, -1), low.reshape(rows, -1)], axis=2).astype(np.float32)
    assert pairs.shape[1] * group == cols
    w = pack_int4(q) if scheme == "int4" else q.to(torch.int8)
    return scheme, w.contiguous(), torch.from_numpy(np.ascontiguousarray(pairs))
