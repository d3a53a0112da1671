"""Jit helpers of the moe op's expert kernels (kernels/moe.py, kernels/moe_grouped.py): one expert's slice of the
stacked expert weights and its weight-only quantization, in the dense matmuls' schemes (kernels/weight_quant.py) applied
per expert: w [E, N, K] int8 with scale [E, N] fp32 (per output channel), or w [E, N, K / 2] u8 with scale
[E, N, K / G, 2] fp32 ((scale, min) per group of G along K). Each expert's [N, K] matrix is quantized exactly as a
linear's weight, so the int4 tiles are dequantized by the same load_grouped.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.matmul_helpers import load_grouped


@triton.jit
def expert_rows(
    w_ptr,  # [N, K] of one expert; [N, K / 2] u8 with W_INT4
    scale_ptr,  # [N, K / GROUP_SIZE, 2] fp32 of that expert (W_INT4); otherwise unread
    rows,  # [BLOCK_N] int64
    k0,  # first k of the chunk, a multiple of BLOCK_K
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
):
    """w[rows, k0:k0 + BLOCK_K] of one expert's matrix, [BLOCK_N, BLOCK_K], 0 outside [N] x [K]: with W_INT4
    dequantized to fp32 by the dense matmuls' load_grouped (same packing, same groups), otherwise as stored (an int8
    tile unscaled: its per-row scale commutes with the sum over K and is applied once after it)."""
    if W_INT4:
        return load_grouped(w_ptr, scale_ptr, rows, k0, N=N, K=K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                            EVEN_K=K % BLOCK_K == 0, GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=EVICT_FIRST, W_INT4=True)
    else:
        return _stored_rows(w_ptr, rows, k0, N=N, K=K, BLOCK_K=BLOCK_K, EVICT_FIRST=EVICT_FIRST)


@triton.jit
def _stored_rows(w_ptr, rows, k0, N: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVICT_FIRST: tl.constexpr):
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    ptrs = w_ptr + rows[:, None] * K + cols[None, :]
    if EVICT_FIRST:
        w = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=mask, other=0)
    return w


@triton.jit
def expert_base(w_ptr, scale_ptr, expert, ROWS: tl.constexpr, K: tl.constexpr, W_INT8: tl.constexpr,
                W_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """(weights, scales) of expert ``expert`` (int64) in [E, ROWS, K] weights and their scales: int8 [E, ROWS],
    int4 [E, ROWS, K / GROUP_SIZE, 2] with [E, ROWS, K / 2] packed bytes (kernels/weight_quant.py, per expert)."""
    if W_INT4:
        w = w_ptr + expert * (ROWS * (K // 2))
        s = scale_ptr + expert * (ROWS * (K // GROUP_SIZE) * 2)
    elif W_INT8:
        w = w_ptr + expert * (ROWS * K)
        s = scale_ptr + expert * ROWS
    else:
        w = w_ptr + expert * (ROWS * K)
        s = scale_ptr
    return w, s


@triton.jit
def row_scale(scale_ptr, rows, N: tl.constexpr):
    """The int8 per-row scales of rows [BLOCK_N], fp32 (0 past N)."""
    return tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
