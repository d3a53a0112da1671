"""Building blocks shared by `linear` and `rms_norm_linear`: out[T, N] = x[T, K] @ w[N, K]^T, fp32 accumulation.

Two regimes, picked by config per token bucket (KernelSpec.tune_buckets, meta["T_bucket"]):

- LOOP_M (GEMV layout, decode): grid (cdiv(N, BLOCK_N), SPLIT_K). A program owns BLOCK_N output columns for
  every row and walks the rows in blocks of BLOCK_M, streaming its slice of W along K (coalesced, K is
  contiguous). When BLOCK_M covers the step's T, W is read from memory exactly once, which is all that
  matters for memory-bound decode. With SPLIT_K > 1 each program covers one K range and writes fp32 partials
  to scratch; a second tiny launch sums them and runs the epilogue. The inner product is either a broadcast
  multiply + sum (USE_DOT False, for BLOCK_M of 1..4 rows) or tl.dot (BLOCK_M >= 16, tensor cores).
- tile grid (GEMM layout, prefill): one BLOCK_M x BLOCK_N tile per program, tl.dot over K, tiles visited in
  groups of GROUP_M rows of tiles so consecutive programs share W tiles in L2.

The RMSNorm fusion (FlashNorm, arXiv 2407.09577): the norm weight is folded into W by the compiler, so the
kernel only needs each row's sum of squares, accumulated from the very x tiles the product streams (USE_RMS),
and scales the accumulator by rstd = 1 / sqrt(sum(x^2) / K + eps) in the epilogue.

The SwiGLU fusion (ACT_SILU_MUL): over a gate_up weight whose rows the compiler interleaved (gate_j, up_j), the
epilogue pairs adjacent columns and stores silu(gate) * up, [T, N / 2], so no [T, N] activation is written and
silu_mul needs no launch of its own. Split-K partials stay [T, N]; the reduce launch applies it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.spec import Config, GridDim, grid_dim

# Notional number of SMs/CUs used to size split-K when no GPU is at hand (H100: 132, MI300X: 304): enough
# programs that every SM holds a few and the memory system sees enough loads in flight.
_TARGET_PROGRAMS = 512
_REDUCE_BLOCK = 256


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
def mm_tile(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]
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
):
    """acc[BLOCK_M, BLOCK_N] = x[rows, k_lo:k_lo+K_SPAN] @ w[cols, same]^T and sumsq[BLOCK_M] = sum of x^2 there."""
    row_mask = rows < T
    col_mask = cols < N
    x_rows = x_ptr + rows[:, None] * stride_x
    w_rows = w_ptr + cols[:, None] * K
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
            w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None], other=0.0)
        else:
            k_mask = ks < K
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
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
    bias_ptr,  # [N]
    residual_ptr,  # [T, N]
    out_ptr,  # [T, N]; [T, N / 2] with ACT_SILU_MUL
    stride_res,
    stride_out,
    eps,
    N: tl.constexpr,
    K: tl.constexpr,
    USE_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT_SILU_MUL: tl.constexpr,
):
    """The epilogue: rstd scale, + bias, + residual, SwiGLU, cast, store. Each element is read from residual
    and written to out by the same program, so out may alias residual.

    ACT_SILU_MUL: w's rows are interleaved (row 2j gate_j, row 2j + 1 up_j), so each even/odd column pair of
    the tile is one (gate, up) pair; out column j = silu(gate_j) * up_j. BLOCK_N is even and every tile starts
    at an even column, so no pair straddles two programs."""
    col_mask = cols < N
    mask = (rows < T)[:, None] & col_mask[None, :]
    if USE_RMS:
        acc = acc * (1.0 / tl.sqrt(sumsq / K + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if ACT_SILU_MUL:
        BM: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        gate, up = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
        acc = gate * tl.sigmoid(gate) * up
        even, _ = tl.split(tl.reshape(cols, (BN // 2, 2)))
        cols = even // 2
        mask = (rows < T)[:, None] & (cols < N // 2)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_program(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N]
    residual_ptr,  # [T, N]
    out_ptr,  # [T, N]; [T, N / 2] with ACT_SILU_MUL
    partial_ptr,  # [SPLIT_K, max_T, N] fp32
    sumsq_ptr,  # [SPLIT_K, max_T] fp32
    T,
    stride_x,
    stride_res,
    stride_out,
    max_T,
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
    USE_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT_SILU_MUL: tl.constexpr,
):
    """One program of the main launch, either layout (see the module docstring)."""
    if LOOP_M:
        pid_n = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        for m0 in range(0, T, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            acc, sumsq = mm_tile(x_ptr, w_ptr, rows, cols, T, stride_x, pid_k * K_SPAN, N, K, K_SPAN,
                                 BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT, USE_RMS)
            if SPLIT_K == 1:
                store_rows(acc, sumsq, rows, cols, T, bias_ptr, residual_ptr, out_ptr, stride_res, stride_out, eps,
                           N, K, USE_RMS, HAS_BIAS, HAS_RESIDUAL, ACT_SILU_MUL)
            else:
                mask = (rows < T)[:, None] & (cols < N)[None, :]
                split = pid_k * max_T * N
                tl.store(partial_ptr + split + rows[:, None] * N + cols[None, :], acc, mask=mask)
                if USE_RMS:
                    # Every column block computes the same partial sums of squares; the first one keeps them.
                    if pid_n == 0:
                        tl.store(sumsq_ptr + pid_k * max_T + rows, sumsq, mask=rows < T)
    else:
        pid_m, pid_n = grouped_tile(tl.program_id(0), T, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, sumsq = mm_tile(x_ptr, w_ptr, rows, cols, T, stride_x, 0, N, K, K_SPAN,
                             BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT, USE_RMS)
        store_rows(acc, sumsq, rows, cols, T, bias_ptr, residual_ptr, out_ptr, stride_res, stride_out, eps,
                   N, K, USE_RMS, HAS_BIAS, HAS_RESIDUAL, ACT_SILU_MUL)


@triton.jit
def reduce_program(
    partial_ptr,  # [SPLIT_K, max_T, N] fp32
    sumsq_ptr,  # [SPLIT_K, max_T] fp32
    bias_ptr,  # [N]
    residual_ptr,  # [T, N]
    out_ptr,  # [T, N]; [T, N / 2] with ACT_SILU_MUL
    T,
    stride_res,
    stride_out,
    max_T,
    eps,
    N: tl.constexpr,
    K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    USE_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT_SILU_MUL: tl.constexpr,
):
    """Second launch of split-K, grid (T, cdiv(N, BLOCK_R)): sum one row's partials over the splits, then the
    epilogue. Partial sums of squares add up to the row's full sum of squares, so rstd is exact."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.full((1, BLOCK_R), 0.0, tl.float32)
    sumsq = tl.full((1,), 0.0, tl.float32)
    for s in tl.static_range(SPLIT_K):
        split_row = row + s * max_T  # row of the [SPLIT_K * max_T, N] partials, int64
        acc += tl.load(partial_ptr + split_row * N + cols, mask=cols < N, other=0.0)[None, :]
        if USE_RMS:
            sumsq += tl.load(sumsq_ptr + split_row)
    rows = row + tl.arange(0, 1)
    store_rows(acc, sumsq, rows, cols, T, bias_ptr, residual_ptr, out_ptr, stride_res, stride_out, eps,
               N, K, USE_RMS, HAS_BIAS, HAS_RESIDUAL, ACT_SILU_MUL)


# ---- host side: configs, heuristics and the pieces of a plan both ops share ----------------------------------


def t_bucket(meta: dict) -> int:
    """The most tokens the chosen config will see: the compiler's token bucket, else the artifact's max_T."""
    return int(meta.get("T_bucket", meta["max_T"]))


def _split_k(N: int, K: int, block_n: int, block_k: int) -> int:
    """Splits of K that bring the program count near _TARGET_PROGRAMS, keeping >= 2 K blocks per split."""
    programs = triton.cdiv(N, block_n)
    split = 1
    while split < 8 and programs * split * 2 <= _TARGET_PROGRAMS and K >= block_k * split * 4:
        split *= 2
    return split


def gemv(block_m: int, block_n: int, block_k: int, split_k: int, use_dot: bool, warps: int = 4,
         stages: int = 3) -> Config:
    return Config.make(num_warps=warps, num_stages=stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       SPLIT_K=split_k, GROUP_M=1, LOOP_M=True, USE_DOT=use_dot)


def gemm(block_m: int, block_n: int, block_k: int, warps: int, stages: int = 3) -> Config:
    return Config.make(num_warps=warps, num_stages=stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       SPLIT_K=1, GROUP_M=8, LOOP_M=False, USE_DOT=True)


def _gemv_blocks(N: int, K: int, T: int) -> list[tuple[int, int]]:
    """(BLOCK_N, BLOCK_K) candidates for the broadcast GEMV, largest tiles first.

    One row (decode at batch 1) is pure weight streaming: narrow column blocks with long K chunks give every SM
    several programs with ~8 KB loads in flight and need no split-K reduce launch. With 2..4 rows the
    [BLOCK_M, BLOCK_N, BLOCK_K] product lives in registers, so K chunks stay short.
    """
    bk_max = min(512, triton.next_power_of_2(K))
    if T == 1:
        return list(dict.fromkeys((bn, min(bk, bk_max)) for bn, bk in ((16, 256), (8, 512), (8, 256), (4, 512))))
    return [(16, min(128, bk_max)), (8, min(128, bk_max)), (32, min(64, bk_max))]


def matmul_configs(meta: dict) -> list[Config]:
    """Candidates for one token bucket: GEMV layouts for decode-sized T, GEMM tiles for prefill."""
    N, K, T = meta["N"], meta["K"], t_bucket(meta)
    if T <= 4:
        bm = triton.next_power_of_2(T)
        blocks = _gemv_blocks(N, K, bm)
        split = [gemv(bm, 32, min(128, triton.next_power_of_2(K)), _split_k(N, K, 32, 128), False)]
        return list(dict.fromkeys([*(gemv(bm, bn, bk, 1, False) for bn, bk in blocks), *split]))
    if T <= 64:
        bm = max(16, triton.next_power_of_2(T))
        return [*(gemv(bm, bn, 64, s, True) for bn in (32, 64) for s in dict.fromkeys((1, _split_k(N, K, bn, 64)))),
                gemm(bm, 64, 64, 4)]
    # At most 8192 operand elements per pipeline stage, so every candidate fits gfx942's 64 KB of LDS.
    return [gemm(bm, bn, bk, w) for bm, bn, bk, w in
            ((64, 64, 64, 4), (64, 128, 32, 4), (128, 64, 32, 4), (128, 128, 32, 8), (128, 128, 32, 4))]


def matmul_default(meta: dict) -> Config:
    """Heuristic when nothing was tuned: stream W once with enough programs in flight, tensor-core tiles above 64."""
    N, K, T = meta["N"], meta["K"], t_bucket(meta)
    if T <= 4:
        bm = triton.next_power_of_2(T)
        # The widest column block that still gives every SM of a large GPU (132 on an H100) two programs.
        for bn, bk in _gemv_blocks(N, K, bm):
            if triton.cdiv(N, bn) >= 2 * 132:
                return gemv(bm, bn, bk, 1, False)
        bn, bk = 32, min(128, triton.next_power_of_2(K))  # small N: split K instead
        return gemv(bm, bn, bk, _split_k(N, K, bn, bk), False)
    if T <= 64:
        return gemv(max(16, triton.next_power_of_2(T)), 64, 64, _split_k(N, K, 64, 64), True)
    return gemm(128, 128, 32, 8) if T >= 256 else gemm(64, 128, 32, 4)


def launch_config(config: Config, dtypes: dict) -> Config:
    """The config's launch options for these dtypes: fp32 operands take twice the shared memory per pipeline
    stage, so they get at most 2 stages (still within gfx942's 64 KB for every candidate tile)."""
    if dtypes["x"] == "fp32" and config.num_stages > 2:
        return Config(config.constexprs, config.num_warps, 2)
    return config


def tile_constexprs(meta: dict, config: Config) -> dict:
    """Constexprs of the main launch shared by both ops (sizes, tiles, layout flags, K range per split)."""
    N, K = meta["N"], meta["K"]
    split, bk = config["SPLIT_K"], config["BLOCK_K"]
    if split > 1 and not config["LOOP_M"]:
        raise ValueError(f"split-K needs the GEMV layout (LOOP_M), got {config}")
    k_span = triton.cdiv(triton.cdiv(K, split), bk) * bk
    return {"N": N, "K": K, "K_SPAN": k_span, "EVEN_K": k_span * split == K,
            **{key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M", "LOOP_M",
                                            "USE_DOT")}}


def tile_grid(meta: dict, config: Config) -> list[GridDim]:
    num_n = triton.cdiv(meta["N"], config["BLOCK_N"])
    if config["LOOP_M"]:
        return [grid_dim(num_n), grid_dim(config["SPLIT_K"])]
    return [grid_dim(("T", config["BLOCK_M"], num_n))]


def reduce_constexprs(meta: dict, config: Config) -> dict:
    return {"N": meta["N"], "K": meta["K"], "SPLIT_K": config["SPLIT_K"], "BLOCK_R": _REDUCE_BLOCK}


def reduce_grid(meta: dict) -> list[GridDim]:
    return [grid_dim(("T", 1, 1)), grid_dim(triton.cdiv(meta["N"], _REDUCE_BLOCK))]


def partial_numel(meta: dict, config: Config) -> int:
    """fp32 elements of the split-K partials scratch, [SPLIT_K, max_T, N]."""
    return config["SPLIT_K"] * meta["max_T"] * meta["N"]
