"""The grouped form of the moe op (kernels/moe.py) for steps of more than one token: tokens grouped by expert,
tl.dot tiles over each expert's tokens, so an expert's weights are read once per tile of BLOCK_M of its tokens
instead of once per token.

After the router (kernels/moe_router.py) writes ids [T, TOP_K]:
  1. count and align (vLLM's moe_align_block_size on the device, no host sync), two launches of cdiv(T, SPAN)
     programs each, so a long prefill does not serialize on one program: count writes each program's per-expert
     number of (token, k) pairs; align sums those rows, gives each expert a run of whole BLOCK_M blocks, writes its
     share of each block's expert and number of filled slots (block_expert -1: unused), and every pair index
     t * TOP_K + k of its SPAN tokens into its expert's run (in index order within each expert).
     The grid of what follows is fixed by T alone: at most cdiv(T * TOP_K, BLOCK_M) + E blocks are filled, and
     cdiv(T, BLOCK_M) * TOP_K + E bounds that; blocks past the last filled one exit at once.
  2. gate_up: one program per (block, BLOCK_N columns of I): act[pair] = silu(x[t] @ gate^T) * (x[t] @ up^T).
  3. down: the same tiles over w2, each pair's expert output (rounded to the activation dtype, as HF rounds it)
     to y [T * TOP_K, D].
  4. combine: kernels/moe.py's down kernel reading y (FROM_Y): one program owns out[t, BLOCK_N columns], residual
     + sum_k weight[t, k] * y[t * TOP_K + k]. No atomics.
Slots of a block past its filled rows are masked on load and store, so they are never read uninitialised.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.matmul_configs import weight_launch_pieces
from kernels.moe_helpers import expert_base, expert_rows, row_scale
from kernels.spec import Config, GridDim, Launch, grid_dim, make_launch, ptr


@triton.jit
def _moe_count_kernel(
    ids_ptr,  # [T * TOP_K] i32, each < E
    counts_ptr,  # [cdiv(T, SPAN), E] i32: the (token, k) pairs of each program's SPAN tokens, per expert
    T,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SPAN: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    lo = pid * SPAN * TOP_K
    hi = tl.minimum(lo + SPAN * TOP_K, T * TOP_K)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(lo, hi, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + idx, mask=idx < hi, other=-1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * E + experts, counts, mask=experts < E)


@triton.jit
def _moe_align_kernel(
    ids_ptr,  # [T * TOP_K] i32, each < E
    counts_ptr,  # [cdiv(T, SPAN), E] i32 from _moe_count_kernel
    sorted_ptr,  # [NB * BLOCK_M] i32: pair indices, expert by expert, each expert's run padded to whole blocks
    block_expert_ptr,  # [NB] i32: the expert of each block; -1 for blocks past the last filled one
    block_rows_ptr,  # [NB] i32: the filled slots of each block (its first ones)
    T,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPAN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    experts = tl.arange(0, BLOCK_E)
    e_mask = experts < E
    # Every program sums the count rows: all of them give each expert's total (so its run of blocks), those of the
    # programs before this one the expert's pairs that precede this program's (so where its own go).
    totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
    before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, programs, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        rows = tl.load(counts_ptr + c[:, None].to(tl.int64) * E + experts[None, :],
                       mask=(c < programs)[:, None] & e_mask[None, :], other=0)
        totals += tl.sum(rows, axis=0)
        before += tl.sum(tl.where((c < pid)[:, None], rows, 0), axis=0)
    blocks = (totals + BLOCK_M - 1) // BLOCK_M
    first = tl.cumsum(blocks, axis=0) - blocks  # each expert's first block
    # This program's share of the block table: NB = cdiv(T, BLOCK_M) * TOP_K + E (the grid's bound) in equal runs.
    num_blocks = tl.cdiv(T, BLOCK_M) * TOP_K + E
    per = tl.cdiv(num_blocks, programs)
    b_hi = tl.minimum(pid * per + per, num_blocks)
    for b0 in range(pid * per, b_hi, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        inside = (b[:, None] >= first[None, :]) & (b[:, None] < (first + blocks)[None, :])  # [CHUNK, BLOCK_E]
        expert = tl.max(tl.where(inside, experts[None, :], -1), axis=1)
        filled = tl.minimum(totals[None, :] - (b[:, None] - first[None, :]) * BLOCK_M, BLOCK_M)
        rows = tl.sum(tl.where(inside, filled, 0), axis=1)
        tl.store(block_expert_ptr + b, expert, mask=b < b_hi)
        tl.store(block_rows_ptr + b, rows, mask=b < b_hi)
    # Pair p goes to slot first[e] * BLOCK_M + (pairs of expert e before p): chunk by chunk, an exclusive running
    # count per expert (from the programs before, then this one's chunks) plus the rank within the chunk (a
    # cumulative sum of the one-hot rows). Pairs stay in index order within each expert, as in one program.
    lo = pid * SPAN * TOP_K
    hi = tl.minimum(lo + SPAN * TOP_K, T * TOP_K)
    running = before
    for c0 in range(lo, hi, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + idx, mask=idx < hi, other=-1)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0) - onehot
        slot = tl.sum(onehot * ((first * BLOCK_M + running)[None, :] + rank), axis=1)
        tl.store(sorted_ptr + slot, idx.to(tl.int32), mask=idx < hi)
        running += tl.sum(onehot, axis=0)


@triton.jit
def _dot(a, b, acc):
    # fp32 models expect fp32 results; the default tf32 would round operands to 10 mantissa bits.
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _w_tile(
    w_ptr,  # [N, K] of one expert; [N, K / 2] u8 with W_INT4
    scale_ptr,  # that expert's int4 (scale, min) groups (W_INT4)
    cols,  # [BLOCK_N] int64, rows of w
    k0,
    dtype: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    """The [BLOCK_K, BLOCK_N] operand w[cols, k0:k0 + BLOCK_K]^T in the activation dtype: int8 values are exact in
    it (|q| <= 127, scaled after the product), int4 ones dequantized in fp32 (load_grouped) and rounded once."""
    if W_INT4:
        w = expert_rows(w_ptr, scale_ptr, cols, k0, N=N, K=K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_INT4=True,
                        GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=False)
        w = tl.trans(w).to(dtype)
    else:
        w = _transposed(w_ptr, cols, k0, dtype, N=N, K=K, BLOCK_K=BLOCK_K)
    return w


@triton.jit
def _transposed(w_ptr, cols, k0, dtype: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr):
    # Read transposed, [BLOCK_K, BLOCK_N]: element (k, n) of row n at n * K + k.
    ks = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=(ks < K)[:, None] & (cols < N)[None, :], other=0.0)
    return w.to(dtype)


@triton.jit
def _moe_grouped_kernel(
    a_ptr,  # gate_up: x [T, D] (row of pair p: t = p // TOP_K); down: act [T * TOP_K, I] (row p)
    w_ptr,  # gate_up: w13 [E, 2 * N, K]; down: w2 [E, N, K]; int8 with W_INT8, [.., K / 2] u8 with W_INT4
    w_scale_ptr,  # [E, ROWS] fp32 (W_INT8), [E, ROWS, K / GROUP_SIZE, 2] fp32 (W_INT4); otherwise bound to w, unread
    sorted_ptr,  # [NB * BLOCK_M] i32
    block_expert_ptr,  # [NB] i32
    block_rows_ptr,  # [NB] i32
    out_ptr,  # gate_up: act [T * TOP_K, N]; down: y [T * TOP_K, N]
    T,
    stride_a,
    N: tl.constexpr,
    K: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATE_UP: tl.constexpr,  # A rows are tokens, w holds gate rows then up rows, out = silu(gate) * up
    W_INT8: tl.constexpr = False,
    W_INT4: tl.constexpr = False,
    GROUP_SIZE: tl.constexpr = 0,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= 0:
        slots = tl.arange(0, BLOCK_M)
        m_mask = slots < tl.load(block_rows_ptr + block)
        pairs = tl.load(sorted_ptr + block * BLOCK_M + slots, mask=m_mask, other=0).to(tl.int64)
        a_rows = pairs // TOP_K if GATE_UP else pairs
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = cols < N
        ROWS: tl.constexpr = 2 * N if GATE_UP else N
        w_base, s_base = expert_base(w_ptr, w_scale_ptr, expert.to(tl.int64), ROWS=ROWS, K=K, W_INT8=W_INT8,
                                     W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE)
        # gate_up's up rows start N rows further on, in the weights and (per row) in the scales alike.
        up_w = w_base + N * (K // 2 if W_INT4 else K)
        up_s = s_base + (N * (K // GROUP_SIZE) * 2 if W_INT4 else (N if W_INT8 else 0))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc = _dot(a, _w_tile(w_base, s_base, cols, k0, a.dtype, N=N, K=K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                  W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE), acc)
            if GATE_UP:
                acc_up = _dot(a, _w_tile(up_w, up_s, cols, k0, a.dtype, N=N, K=K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                         W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE), acc_up)
        if W_INT8:  # each output column's scale, once after the sum over K (it commutes with it)
            acc = acc * row_scale(s_base, cols, N=N)[None, :]
            if GATE_UP:
                acc_up = acc_up * row_scale(up_s, cols, N=N)[None, :]
        # Rounded to the activation dtype where HF rounds: the gate_up product, the expert's down output.
        res = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        if GATE_UP:
            up = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
            res = res / (1.0 + tl.exp(-res)) * up  # silu(g) * up; -0, never NaN, for g -> -inf
        tl.store(out_ptr + pairs[:, None] * N + cols[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def tile_config(block_m: int, block_n: int, block_k: int, warps: int, stages: int = 2) -> Config:
    return Config.make(num_warps=warps, num_stages=stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def _blocks_grid(top_k: int, E: int, block_m: int) -> GridDim:
    """cdiv(T, BLOCK_M) * TOP_K + E: a bound on the blocks align fills, fixed by T."""
    return grid_dim(("T", block_m, top_k), E)


def scratch(meta: dict, tokens: int, config: Config, act_dtype: str) -> tuple[tuple[str, tuple[int, str]], ...]:
    """Scratch of the grouped launches for steps of up to ``tokens`` tokens (besides moe.py's act, ids, weights)."""
    bm = config["BLOCK_M"]
    blocks = -(-tokens // bm) * meta["top_k"] + meta["E"]
    counts = -(-tokens // align_span(meta["top_k"])) * meta["E"]
    return (("sorted", (blocks * bm, "i32")), ("block_expert", (blocks, "i32")), ("block_rows", (blocks, "i32")),
            ("y", (tokens * meta["top_k"] * meta["D"], act_dtype)), ("align_counts", (counts, "i32")))


def align_span(top_k: int) -> int:
    """Tokens per program of the count and align launches: 512 (token, k) pairs, so that an 8k-token prefill at
    top 8 spreads over 128 programs (one program took all of them before), while a program's share of the
    count rows every program sums (cdiv(T, SPAN) x E) stays small."""
    return max(1, 512 // top_k)


def launches(meta: dict, dtypes: dict, config: Config) -> tuple[Launch, ...]:
    """count, align, gate_up, down for a tile config (BLOCK_M, BLOCK_N, BLOCK_K); moe.py's down kernel combines
    after."""
    E, D, I, top_k = meta["E"], meta["D"], meta["I"], meta["top_k"]
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    dtypes = {**dtypes, "act": dtypes["out"], "y": dtypes["out"]}
    index = {"sorted_ptr": ("tensor", "sorted"), "block_expert_ptr": ("tensor", "block_expert"),
             "block_rows_ptr": ("tensor", "block_rows")}
    index_types = {"sorted_ptr": "*i32", "block_expert_ptr": "*i32", "block_rows_ptr": "*i32"}
    span, chunk = align_span(top_k), max(16, min(128, 8192 // triton.next_power_of_2(E)))
    shape = {"E": E, "TOP_K": top_k, "BLOCK_E": triton.next_power_of_2(E), "SPAN": span, "CHUNK": chunk}
    programs = grid_dim(("T", span, 1))
    count = make_launch(
        _moe_count_kernel, types={"ids_ptr": "*i32", "counts_ptr": "*i32", "T": "i32"}, constexprs=shape,
        args={"ids_ptr": ("tensor", "topk_ids"), "counts_ptr": ("tensor", "align_counts"), "T": ("sym", "T")},
        grid=[programs], config=Config.make(num_warps=4, num_stages=1))
    align = make_launch(
        _moe_align_kernel, types={"ids_ptr": "*i32", "counts_ptr": "*i32", **index_types, "T": "i32"},
        constexprs={**shape, "BLOCK_M": bm, "BLOCK_C": max(1, 4096 // triton.next_power_of_2(E))},
        args={"ids_ptr": ("tensor", "topk_ids"), "counts_ptr": ("tensor", "align_counts"), **index, "T": ("sym", "T")},
        grid=[programs], config=Config.make(num_warps=4, num_stages=1))

    def grouped(a: str, w: str, out: str, N: int, K: str, stride_a: int, gate_up: bool) -> Launch:
        scale_types, scale_args, quant = weight_launch_pieces(meta, dtypes, w, f"{w}_scale", K, "w_scale_ptr")
        K = meta[K]
        return make_launch(
            _moe_grouped_kernel,
            types={"a_ptr": ptr(dtypes[a]), "w_ptr": ptr(dtypes[w]), **scale_types, **index_types,
                   "out_ptr": ptr(dtypes[out]), "T": "i32", "stride_a": "i64"},
            constexprs={"N": N, "K": K, "TOP_K": top_k, "BLOCK_M": bm, "BLOCK_N": min(bn, triton.next_power_of_2(N)),
                        "BLOCK_K": min(bk, triton.next_power_of_2(K)), "GATE_UP": gate_up, **quant},
            args={"a_ptr": ("tensor", a), "w_ptr": ("tensor", w), **scale_args, **index, "out_ptr": ("tensor", out),
                  "T": ("sym", "T"), "stride_a": ("int", stride_a)},
            grid=[_blocks_grid(top_k, E, bm), grid_dim(-(-N // min(bn, triton.next_power_of_2(N))))], config=config)

    return (count, align, grouped("x", "w13", "act", I, "D", meta.get("stride_x", D), True),
            grouped("act", "w2", "y", D, "I", I, False))
