"""Building blocks shared by `linear` and `rms_norm_linear`: out[T, N] = x[T, K] @ w[N, K]^T, fp32 accumulation.

Two regimes, picked by config per token bucket (KernelSpec.tune_buckets, meta["T_bucket"]):

- LOOP_M (GEMV layout, decode): grid (cdiv(N, BLOCK_N), SPLIT_K). A program owns BLOCK_N output columns for
  every row and walks the rows in blocks of BLOCK_M, streaming its slice of W along K (coalesced, K is
  contiguous; weights evict-first, activations evict-last). When BLOCK_M covers the step's T, W is read from
  memory exactly once, which is all that matters for memory-bound decode. Decode is bound by bytes in flight:
  every SM must hold enough weight loads for the whole kernel, so small-N shapes split K. With SPLIT_K > 1 each
  program covers one K range and writes fp32 partials to scratch; the last program of a column block to finish
  (a per-block semaphore, zero between launches) sums them and runs the epilogue, so split-K costs no second
  launch. The product is a broadcast multiply accumulated in registers (USE_DOT False, 1..4 rows) or tl.dot of
  w against x^T (BLOCK_M of 16 and more, tensor cores with the wide side as the MMA's M).
- tile grid (GEMM layout, prefill): one BLOCK_M x BLOCK_N tile per program, tl.dot over K, tiles visited in
  groups of GROUP_M rows of tiles so consecutive programs share W tiles in L2.

The RMSNorm fusion (FlashNorm, arXiv 2407.09577): the norm weight is folded into W by the compiler, so the
kernel only needs each row's sum of squares (a short pass of its own over x; USE_RMS), and scales the
accumulator by rstd = 1 / sqrt(sum(x^2) / K + eps) in the epilogue. A quantized weight cannot take g (a column
scaling moves W off the grid it was quantized on, e.g. a GGUF's Q4_1 blocks), so with USE_NORM_W the compiler leaves
g out of W and the kernel multiplies each x tile by norm_w[k] (fp32) before the product; the sum of squares stays on
the raw x, and rstd is applied in the epilogue as before.

The SwiGLU fusion (ACT_SILU_MUL): over a gate_up weight whose rows the compiler interleaved (gate_j, up_j), the
epilogue pairs adjacent columns and stores silu(gate) * up, [T, N / 2], so no [T, N] activation is written and
silu_mul needs no launch of its own. Split-K partials stay [T, N]; the program that reduces them applies it.

The rope fusion (ACT_ROPE, qkv only): over a qkv weight whose q and k rows the compiler paired the same way, the
epilogue rotates each (even, odd) column pair and stores it at its own columns of qkv, and with WRITE_CACHE the k
and v heads in the paged KV cache too, so rope needs no launch of its own (kernels/rope_epilogue.py).

Weight-only int8 (W_INT8): w is int8, symmetric per output channel (the compiler's quantize_weights), and
scale[N] fp32 holds each row's step. A per-column scale commutes with the sum over K, so the tiles load int8, widen it
(to the activation dtype for tl.dot, to fp32 for the broadcast product; every int8 value is exact in fp16 and bf16)
and the epilogue multiplies each column of the accumulator by its scale, before rstd, bias, residual and activation.
Split-K partials stay unscaled; the program that reduces them scales them.

Weight-only int4 (W_INT4, GROUP_SIZE): w is [N, K / 2] uint8, two 4-bit q per byte (low nibble even k, high nibble
odd k), asymmetric per group of GROUP_SIZE k of a row, and scale [N, K / GROUP_SIZE, 2] fp32 holds each group's
(scale, min): W = q * scale + min (kernels/weight_quant.py). The scale varies along K, so it cannot wait for the
epilogue: each K chunk loads BLOCK_K / 2 contiguous bytes per row, splits the nibbles back to their K positions and
dequantizes in fp32 (load_grouped) before the same product. A chunk starts at a multiple of BLOCK_K, so when
BLOCK_K <= GROUP_SIZE (both powers of two) it lies inside one group and takes one (scale, min) per row; a longer
chunk holds BLOCK_K / GROUP_SIZE whole groups and takes that many pairs per row, each broadcast over its group. The
epilogue then has no weight scale to apply.

Weight-only grouped int8 (int8_group: GROUP_SIZE > 0 without W_INT4 or W_INT8; what a GGUF's Q8_0, Q5_K and Q6_K
blocks are repacked into): w is [N, K] int8 with the same [N, K / GROUP_SIZE, 2] (scale, min) pairs, group 16 or 32,
and load_grouped dequantizes it the same way, one byte per k.

Which layout and tiles a node gets per token bucket, and the plan pieces both ops share: kernels/matmul_configs.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.pdl import PDL_EARLY, PDL_LATE, launch_dependents, wait
from kernels.rope_epilogue import store_rotated

# ACT_SILU_MUL: False off, True the SwiGLU epilogue, ACT_GELU_TANH the GeGLU one (same pairing, gelu_tanh(gate)).
ACT_GELU_TANH = tl.constexpr(2)

@triton.jit
def grouped_tile(pid, T, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a flat program id to (row tile, column tile), GROUP_M row tiles at a time (L2 reuse of W tiles)."""
    num_m = tl.cdiv(T, BLOCK_M)
    num_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def apply_norm_w(
    x,  # [BLOCK_M, BLOCK_K] the x tile at ks
    norm_w_ptr,  # [K]
    ks,  # [BLOCK_K] int64
    K: tl.constexpr,
):
    """x * norm_w[ks] in fp32, back in x's dtype (the operand dtype tl.dot wants; exact for fp32 models)."""
    g = tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * g[None, :]).to(x.dtype)


@triton.jit
def load_grouped(
    w_ptr,  # [N, K / 2] u8, two q per byte (W_INT4); [N, K] i8 (int8_group)
    scale_ptr,  # [N, K / GROUP_SIZE, 2] fp32 (scale, min)
    cols,  # [BLOCK_N] int64
    k,  # first k of the chunk, a multiple of BLOCK_K
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    W_INT4: tl.constexpr,
):
    """w[cols, k:k + BLOCK_K] dequantized to fp32 (q * scale + min per group), [BLOCK_N, BLOCK_K]; 0 outside
    [N] x [K]. W_INT4: q unpacked from nibbles; else int8_group: q read as int8, one byte per k."""
    NUM_GROUPS: tl.constexpr = K // GROUP_SIZE
    col_mask = cols < N
    if W_INT4:
        KH: tl.constexpr = K // 2
        half = k // 2 + tl.arange(0, BLOCK_K // 2)
        if EVEN_K:
            mask = col_mask[:, None]
        else:
            mask = col_mask[:, None] & (half < KH)[None, :]
        ptrs = w_ptr + cols[:, None] * KH + half[None, :]
    else:
        ks = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mask = col_mask[:, None]
        else:
            mask = col_mask[:, None] & (ks < K)[None, :]
        ptrs = w_ptr + cols[:, None] * K + ks[None, :]
    if EVICT_FIRST:
        raw = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    else:
        raw = tl.load(ptrs, mask=mask, other=0)
    if W_INT4:
        # Byte j holds k = 2j (low nibble) and 2j + 1 (high): joined on a new last axis, a row-major reshape puts
        # each nibble at its own k.
        q = tl.reshape(tl.join(raw & 15, raw >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
    else:
        q = raw.to(tl.float32)
    if BLOCK_K <= GROUP_SIZE:
        # One group per row: k is a multiple of BLOCK_K, which divides GROUP_SIZE. A split's chunk may start past K.
        group_ptrs = scale_ptr + (cols * NUM_GROUPS + k // GROUP_SIZE) * 2
        g_mask = col_mask & (k < K)
        scale = tl.load(group_ptrs, mask=g_mask, other=0.0)
        low = tl.load(group_ptrs + 1, mask=g_mask, other=0.0)
        return q * scale[:, None] + low[:, None]
    else:
        # BLOCK_K / GROUP_SIZE whole groups per row (both powers of two, k a multiple of BLOCK_K): one (scale, min)
        # per group, broadcast over its GROUP_SIZE k, rather than a per-k gather (BLOCK_K pairs of fp32 per row,
        # which pipelining would also stage in shared memory).
        PER: tl.constexpr = BLOCK_K // GROUP_SIZE
        groups = k // GROUP_SIZE + tl.arange(0, PER)
        group_ptrs = scale_ptr + (cols[:, None] * NUM_GROUPS + groups[None, :]) * 2
        g_mask = col_mask[:, None] & (groups < NUM_GROUPS)[None, :]
        scale = tl.load(group_ptrs, mask=g_mask, other=0.0)
        low = tl.load(group_ptrs + 1, mask=g_mask, other=0.0)
        grouped = tl.reshape(q, (BLOCK_N, PER, GROUP_SIZE)) * scale[:, :, None] + low[:, :, None]
        return tl.reshape(grouped, (BLOCK_N, BLOCK_K))


@triton.jit
def mm_tile(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]; [N, K / 2] u8 with W_INT4; [N, K] i8 (int8_group)
    scale_ptr,  # [N, K / GROUP_SIZE, 2] fp32 (GROUP_SIZE > 0)
    norm_w_ptr,  # [K] (USE_NORM_W)
    rows,  # [BLOCK_M] int64
    cols,  # [BLOCK_N] int64
    T,
    stride_x,
    k_lo,
    N: tl.constexpr,
    K: tl.constexpr,
    K_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    USE_RMS: tl.constexpr,
    W_INT8: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    USE_NORM_W: tl.constexpr,
):
    """acc[BLOCK_M, BLOCK_N] = x[rows, k_lo:k_lo+K_SPAN] @ w[cols, same]^T and sumsq[BLOCK_M] = sum of x^2 there
    (with W_INT8 the product of the int8 values, unscaled)."""
    row_mask = rows < T
    col_mask = cols < N
    x_rows = x_ptr + rows[:, None] * stride_x
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    sumsq = tl.full((BLOCK_M,), 0.0, tl.float32)
    if USE_RMS:
        # The sum of squares gets its own pass over the x tile rather than sharing the product's loads: with
        # a tl.dot operand also reduced in registers, software pipelining (num_stages >= 3) miscompiled some
        # tiles on sm_90 (seen on an H100, Triton 3.6). x is [BLOCK_M, K], small next to W, and L2-resident.
        for k in range(k_lo, k_lo + K_SPAN, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            xf = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
    for k in range(k_lo, k_lo + K_SPAN, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None], other=0.0)
            w_mask = col_mask[:, None]
        else:
            k_mask = ks < K
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = col_mask[:, None] & k_mask[None, :]
        if USE_NORM_W:
            x = apply_norm_w(x, norm_w_ptr, ks, K=K)
        if GROUP_SIZE > 0:
            w = load_grouped(w_ptr, scale_ptr, cols, k, N=N, K=K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=EVEN_K,
                             GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=False, W_INT4=W_INT4)
        else:
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
        if (W_INT8 or GROUP_SIZE > 0) and USE_DOT:
            # int8: exact (|q| <= 127); int4: the fp32 dequantized value rounded once to the activation dtype
            w = w.to(x.dtype)
        if USE_DOT:
            if x.dtype == tl.float32:
                # fp32 models expect fp32 results; the default tf32 would round operands to 10 mantissa bits.
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc, sumsq


@triton.jit
def store_rows(
    acc,  # [BLOCK_M, BLOCK_N] fp32: x @ w^T for these rows and columns
    sumsq,  # [BLOCK_M] fp32: sum of x^2 over all of K (used with USE_RMS)
    rows,  # [BLOCK_M] int64
    cols,  # [BLOCK_N] int64
    T,
    scale_ptr,  # [N] fp32 (W_INT8)
    bias_ptr,  # [N]
    residual_ptr,  # [T, N]
    out_ptr,  # [T, N]; [T, N / 2] with ACT_SILU_MUL
    positions_ptr,  # [T] i32 (ACT_ROPE)
    cos_sin_ptr,  # [max_pos, ROT_DIM] fp32 (ACT_ROPE)
    slot_mapping_ptr,  # [T] i32 (ACT_ROPE with WRITE_CACHE)
    k_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM] (ACT_ROPE with WRITE_CACHE)
    v_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM] (ACT_ROPE with WRITE_CACHE)
    stride_res,
    stride_out,
    eps,
    N: tl.constexpr,
    K: tl.constexpr,
    W_INT8: tl.constexpr,
    USE_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT_SILU_MUL: tl.constexpr,
    ACT_ROPE: tl.constexpr,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    """The epilogue: int8 weight scale, rstd scale, + bias, + residual, SwiGLU or rope, cast, store. Each element is
    read from residual and written to out by the same program, so out may alias residual.

    ACT_SILU_MUL: w's rows are interleaved (row 2j gate_j, row 2j + 1 up_j), so each even/odd column pair of
    the tile is one (gate, up) pair; out column j = silu(gate_j) * up_j. BLOCK_N is even and every tile starts
    at an even column, so no pair straddles two programs. ACT_ROPE: the same pairing over the q and k heads'
    rotation pairs (kernels/rope_epilogue.py), stored back at their own columns of qkv (and the KV caches)."""
    col_mask = cols < N
    mask = (rows < T)[:, None] & col_mask[None, :]
    if W_INT8:
        acc = acc * tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if USE_RMS:
        acc = acc * (1.0 / tl.sqrt(sumsq / K + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if ACT_ROPE:
        store_rotated(acc, rows, cols, T, out_ptr, stride_out, positions_ptr, cos_sin_ptr, slot_mapping_ptr,
                      k_cache_ptr, v_cache_ptr, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM, ROT_DIM=ROT_DIM, IS_NEOX=IS_NEOX,
                      WRITE_CACHE=WRITE_CACHE)
    else:
        if ACT_SILU_MUL:
            BM: tl.constexpr = acc.shape[0]
            BN: tl.constexpr = acc.shape[1]
            gate, up = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
            if ACT_SILU_MUL == ACT_GELU_TANH:
                # gelu_tanh(g) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3), as kernels/silu_mul.py computes it.
                u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
                acc = gate / (1.0 + tl.exp(-2.0 * u)) * up
            else:
                acc = gate * tl.sigmoid(gate) * up
            # The tile's output columns, written as a range from its first (cols is one: a multiple of BN onwards) so
            # the compiler sees them contiguous and coalesces the store.
            cols = tl.min(cols, axis=0) // 2 + tl.arange(0, BN // 2)
            mask = (rows < T)[:, None] & (cols < N // 2)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemv_tile(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]; [N, K / 2] u8 with W_INT4; [N, K] i8 (int8_group)
    scale_ptr,  # [N, K / GROUP_SIZE, 2] fp32 (GROUP_SIZE > 0)
    norm_w_ptr,  # [K] (USE_NORM_W)
    rows,  # [BLOCK_M] int64
    cols,  # [BLOCK_N] int64
    T,
    stride_x,
    k_lo,
    N: tl.constexpr,
    K: tl.constexpr,
    K_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    USE_RMS: tl.constexpr,
    W_INT8: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    USE_NORM_W: tl.constexpr,
):
    """acc[BLOCK_M, BLOCK_N] = x[rows, k_lo:k_lo+K_SPAN] @ w[cols, same]^T, and the rows' sum of x^2 over that
    K range, for the weight-streaming layout. W is read once and never again, so its loads are evict-first; x is
    re-read by every program, so it is kept in cache (evict-last).

    The broadcast product accumulates elementwise in a [BLOCK_M, BLOCK_N, BLOCK_K] fp32 register tile and reduces
    along K once at the end: reducing every chunk would put a cross-warp reduction (shared memory and a barrier)
    between consecutive weight loads. The tl.dot form computes w @ x^T, so the wide BLOCK_N side is the MMA's M
    (Hopper's wgmma wants M >= 64) and the few token rows its N."""
    row_mask = rows < T
    col_mask = cols < N
    x_rows = x_ptr + rows[:, None] * stride_x
    if USE_DOT:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N, BLOCK_K), 0.0, tl.float32)
    sumsq = tl.full((BLOCK_M,), 0.0, tl.float32)
    for k in range(k_lo, k_lo + K_SPAN, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = row_mask[:, None]
            w_mask = col_mask[:, None]
        else:
            x_mask = row_mask[:, None] & (ks < K)[None, :]
            w_mask = col_mask[:, None] & (ks < K)[None, :]
        if GROUP_SIZE > 0:
            w = load_grouped(w_ptr, scale_ptr, cols, k, N=N, K=K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=EVEN_K,
                             GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=True, W_INT4=W_INT4)
        else:
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=w_mask, other=0.0,
                        eviction_policy="evict_first")
        x = tl.load(x_rows + ks[None, :], mask=x_mask, other=0.0, eviction_policy="evict_last")
        if (W_INT8 or GROUP_SIZE > 0) and USE_DOT:
            # int8: exact (|q| <= 127); int4: the fp32 dequantized value rounded once to the activation dtype
            w = w.to(x.dtype)  # exact: |q| <= 127; the broadcast product below widens it to fp32 itself
        if USE_RMS:
            if USE_DOT:
                # A load of its own: the tl.dot operand also reduced in registers miscompiled on sm_90 once
                # pipelined (seen in the GEMM tiles, Triton 3.6). Same addresses, so it hits the cache.
                xs = tl.load(x_rows + ks[None, :], mask=x_mask, other=0.0, eviction_policy="evict_last")
            else:
                xs = x
            xs = xs.to(tl.float32)
            sumsq += tl.sum(xs * xs, axis=1)
        if USE_NORM_W:  # after the sum of squares, which is over the raw x
            x = apply_norm_w(x, norm_w_ptr, ks, K=K)
        if USE_DOT:
            if x.dtype == tl.float32:
                # fp32 models expect fp32 results; the default tf32 would round operands to 10 mantissa bits.
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if USE_DOT:
        out = tl.trans(acc)
    else:
        out = tl.sum(acc, axis=2)
    return out, sumsq


@triton.jit
def matmul_program(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]; int8 with W_INT8 or int8_group; [N, K / 2] u8 with W_INT4
    scale_ptr,  # [N] fp32 (W_INT8); [N, K / GROUP_SIZE, 2] fp32 (GROUP_SIZE > 0: W_INT4 or int8_group)
    norm_w_ptr,  # [K] (USE_NORM_W)
    bias_ptr,  # [N]
    residual_ptr,  # [T, N]
    out_ptr,  # [T, N]; [T, N / 2] with ACT_SILU_MUL
    partial_ptr,  # [SPLIT_K, ROWS, N] fp32
    sumsq_ptr,  # [cdiv(N, BLOCK_N), SPLIT_K, ROWS] fp32 (USE_RMS)
    sem_ptr,  # [cdiv(N, BLOCK_N)] i32, zero between launches
    positions_ptr,  # [T] i32 (ACT_ROPE)
    cos_sin_ptr,  # [max_pos, ROT_DIM] fp32 (ACT_ROPE)
    slot_mapping_ptr,  # [T] i32 (ACT_ROPE with WRITE_CACHE)
    k_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM] (ACT_ROPE with WRITE_CACHE)
    v_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM] (ACT_ROPE with WRITE_CACHE)
    T,
    stride_x,
    stride_res,
    stride_out,
    rows_cap,  # ROWS: rows of the partials (the variant's most tokens)
    eps,
    N: tl.constexpr,
    K: tl.constexpr,
    K_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LOOP_M: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    W_INT8: tl.constexpr,
    USE_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT_SILU_MUL: tl.constexpr,
    ACT_ROPE: tl.constexpr,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    USE_PDL: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    USE_NORM_W: tl.constexpr,
    RMS_PREPASS: tl.constexpr = False,
    row_sumsq_ptr=None,  # [ROWS] fp32: each row's sum of x^2, written by rms_norm_linear's pre-pass (RMS_PREPASS)
):
    """One program of the launch, either layout (see the module docstring)."""
    # With the pre-pass the tiles compute no sum of squares of their own; the epilogue loads each row's.
    TILE_RMS: tl.constexpr = USE_RMS and not RMS_PREPASS
    if USE_PDL:
        # Programmatic dependent launch (kernels/pdl.py): every program waits for the previous kernel before its
        # first load, weights included. Triton's passes move loads (cp.async above all) across the wait's inline
        # asm, so a weight load placed before it would drag activation loads along (seen in the sm_90 PTX;
        # tests/kernels/test_pdl.py checks that no memory access precedes the wait).
        wait()
        if USE_PDL == PDL_EARLY:
            launch_dependents()
    if LOOP_M:
        pid_n = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        for m0 in range(0, T, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            acc, sumsq = gemv_tile(x_ptr, w_ptr, scale_ptr, norm_w_ptr, rows, cols, T, stride_x, pid_k * K_SPAN,
                                   N=N, K=K, K_SPAN=K_SPAN, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                   EVEN_K=EVEN_K, USE_DOT=USE_DOT, USE_RMS=TILE_RMS, W_INT8=W_INT8, W_INT4=W_INT4,
                                   GROUP_SIZE=GROUP_SIZE, USE_NORM_W=USE_NORM_W)
            if RMS_PREPASS:
                sumsq = tl.load(row_sumsq_ptr + rows, mask=rows < T, other=0.0)
            if SPLIT_K == 1:
                store_rows(acc, sumsq, rows, cols, T, scale_ptr, bias_ptr, residual_ptr, out_ptr, positions_ptr,
                           cos_sin_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr, stride_res, stride_out, eps,
                           N=N, K=K, W_INT8=W_INT8, USE_RMS=USE_RMS, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
                           ACT_SILU_MUL=ACT_SILU_MUL, ACT_ROPE=ACT_ROPE, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM,
                           ROT_DIM=ROT_DIM, IS_NEOX=IS_NEOX, WRITE_CACHE=WRITE_CACHE)
            else:
                mask = (rows < T)[:, None] & (cols < N)[None, :]
                tl.store(partial_ptr + pid_k * rows_cap * N + rows[:, None] * N + cols[None, :], acc, mask=mask)
                if TILE_RMS:
                    tl.store(sumsq_ptr + (pid_n * SPLIT_K + pid_k) * rows_cap + rows, sumsq, mask=rows < T)
        if USE_PDL == PDL_LATE:  # the weights are read: the next kernel's programs may take this one's place
            launch_dependents()
        if SPLIT_K > 1:
            # Split-K without a second launch: the last of the SPLIT_K programs of this column block to arrive
            # sums the partials, in split order (deterministic), runs the epilogue and re-arms the semaphore.
            # The barrier orders every thread's partial stores before the one thread's acq_rel increment.
            tl.debug_barrier()
            arrived = tl.atomic_add(sem_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                for m0 in range(0, T, BLOCK_M):
                    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
                    mask = (rows < T)[:, None] & (cols < N)[None, :]
                    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                    sumsq = tl.full((BLOCK_M,), 0.0, tl.float32)
                    for s in tl.static_range(SPLIT_K):
                        # .cg: from L2, where the other programs' partials are, never a stale L1 line.
                        acc += tl.load(partial_ptr + s * rows_cap * N + rows[:, None] * N + cols[None, :], mask=mask,
                                       other=0.0, cache_modifier=".cg")
                        if TILE_RMS:
                            sumsq += tl.load(sumsq_ptr + (pid_n * SPLIT_K + s) * rows_cap + rows, mask=rows < T,
                                             other=0.0, cache_modifier=".cg")
                    if RMS_PREPASS:
                        sumsq = tl.load(row_sumsq_ptr + rows, mask=rows < T, other=0.0)
                    store_rows(acc, sumsq, rows, cols, T, scale_ptr, bias_ptr, residual_ptr, out_ptr, positions_ptr,
                               cos_sin_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr, stride_res, stride_out, eps,
                               N=N, K=K, W_INT8=W_INT8, USE_RMS=USE_RMS, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
                               ACT_SILU_MUL=ACT_SILU_MUL, ACT_ROPE=ACT_ROPE, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM,
                               ROT_DIM=ROT_DIM, IS_NEOX=IS_NEOX, WRITE_CACHE=WRITE_CACHE)
                tl.atomic_xchg(sem_ptr + pid_n, 0)
    else:
        pid_m, pid_n = grouped_tile(tl.program_id(0), T, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, sumsq = mm_tile(x_ptr, w_ptr, scale_ptr, norm_w_ptr, rows, cols, T, stride_x, 0, N=N, K=K,
                             K_SPAN=K_SPAN, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=EVEN_K,
                             USE_DOT=USE_DOT, USE_RMS=TILE_RMS, W_INT8=W_INT8, W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE,
                             USE_NORM_W=USE_NORM_W)
        if RMS_PREPASS:
            sumsq = tl.load(row_sumsq_ptr + rows, mask=rows < T, other=0.0)
        if USE_PDL == PDL_LATE:
            launch_dependents()
        store_rows(acc, sumsq, rows, cols, T, scale_ptr, bias_ptr, residual_ptr, out_ptr, positions_ptr,
                   cos_sin_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr, stride_res, stride_out, eps,
                   N=N, K=K, W_INT8=W_INT8, USE_RMS=USE_RMS, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
                   ACT_SILU_MUL=ACT_SILU_MUL, ACT_ROPE=ACT_ROPE, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM,
                   ROT_DIM=ROT_DIM, IS_NEOX=IS_NEOX, WRITE_CACHE=WRITE_CACHE)
