"""Paged attention for decode steps: one query token per sequence, split-KV over the cached context.

Decode attention is a pure stream over the KV cache, so each K/V tile is read exactly once: one program
owns (sequence, kv head, split) and computes all GROUP q heads that share the kv head, as the rows of a
tl.dot padded to BLOCK_G >= 16 rows (tensor cores need 16; the padding rows cost no memory traffic).
A sequence's key tiles are cut into NUM_SPLITS contiguous ranges so that short batches still fill the
GPU; each split writes its normalised partial output and log-sum-exp (base 2) to fp32 scratch, and the last
split of a (sequence, kv head) to finish (a semaphore counts them, as in split-K matmuls) combines them:
out = sum_j 2^(lse_j - M) o_j / sum_j 2^(lse_j - M), M = max_j lse_j, in split order. So there is one launch
however many splits there are: at batch 1 a second (combine) launch per layer cost ~1.3 µs plus its launch gap
on an H200. With NUM_SPLITS == 1 the program writes the output itself.
A padding row (seq_len 0) reads no key, its splits report lse = -inf, and its output is zeros.

Sliding window (USE_WINDOW): the query at position seq_len - 1 sees the last WINDOW keys only, so the splits
divide the tiles of [seq_len - WINDOW, seq_len) and blocks before the window are never loaded; a window that
starts inside a cache block needs no mask, as the first tile starts at the window's first key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_helpers import LOG2E, mma, online_softmax_step, paged_kv_offsets
from kernels.attention_prefill import paged_attention, window_constexprs
from kernels.spec import SEMAPHORES, Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _attention_decode_kernel(
    qkv_ptr,  # [S, (Hq + 2 * Hk) * Dh]: q read from the first Hq * Dh columns
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hk, Dh]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hk, Dh]
    seq_lens_ptr,  # [S] i32
    block_tables_ptr,  # [S, max_blocks] i32
    out_ptr,  # [S, Hq * Dh]; written only when NUM_SPLITS == 1
    part_out_ptr,  # [max_S, Hq, NUM_SPLITS, Dh] fp32; unused when NUM_SPLITS == 1
    part_lse_ptr,  # [max_S, Hq, NUM_SPLITS] fp32; unused when NUM_SPLITS == 1
    sem_ptr,  # [max_S, Hk] i32, zero between launches; unused when NUM_SPLITS == 1
    stride_qkv,
    stride_bt,
    stride_out,
    qk_scale,  # scale * log2(e)
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    WINDOW: tl.constexpr,  # keys the query sees, its own included; read only with USE_WINDOW
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - WINDOW, 0)
    # Splits divide this sequence's own key tiles, so short sequences in a long-context batch stay balanced.
    tiles_per_split = ((((seq_len - lo) + BLOCK_N - 1) // BLOCK_N) + NUM_SPLITS - 1) // NUM_SPLITS
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

    g = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + g
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_mask = (g < GROUP)[:, None] & dim_ok[None, :]
    q = tl.load(qkv_ptr + seq * stride_qkv + head[:, None] * HEAD_DIM + dims[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        offs = paged_kv_offsets(table, n, n_ok, BLOCK_SIZE, NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
        kv_mask = n_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.where(n_ok[None, :], mma(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, m_i, l_i, acc, v)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out = out_ptr + seq * stride_out + head[:, None] * HEAD_DIM + dims[None, :]
    if NUM_SPLITS == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        rows = (seq * NUM_Q_HEADS + head) * NUM_SPLITS  # [BLOCK_G] first scratch row of each q head
        tl.store(part_out_ptr + (rows + split)[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + rows + split, lse, mask=g < GROUP)
        # The barrier orders every thread's partial stores before the one acq_rel increment; the last of the
        # NUM_SPLITS programs to arrive reads the others' partials from L2 (.cg) and re-arms the semaphore.
        tl.debug_barrier()
        sem = sem_ptr + seq * NUM_KV_HEADS + kv_head
        arrived = tl.atomic_add(sem, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            total = tl.full([BLOCK_G], 0.0, tl.float32)
            res = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
            for j in range(NUM_SPLITS):
                lse_j = tl.load(part_lse_ptr + rows + j, mask=g < GROUP, other=float("-inf"), cache_modifier=".cg")
                o_j = tl.load(part_out_ptr + (rows + j)[:, None] * HEAD_DIM + dims[None, :], mask=q_mask,
                              other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m, lse_j)
                # Empty splits (and every split of a padding row) have lse = -inf and weigh exactly 0.
                base = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - base)
                w = tl.exp2(lse_j - base)
                res = res * alpha[:, None] + w[:, None] * o_j
                total = total * alpha + w
                m = m_new
            res = res / tl.where(total > 0.0, total, 1.0)[:, None]
            tl.store(out, res.to(out_ptr.dtype.element_ty), mask=q_mask)
            tl.atomic_xchg(sem, 0)


def _group(meta: dict) -> int:
    hq, hk = meta["num_q_heads"], meta["num_kv_heads"]
    assert hq % hk == 0, f"num_q_heads {hq} is not a multiple of num_kv_heads {hk}"
    return hq // hk


def _splits(meta: dict) -> int:
    """Enough (sequence, kv head, split) programs to fill a big GPU several times over (~1024: 132 SMs
    on an H100, 304 CUs on an MI300X), but no split shorter than 256 tokens of context, where the
    partial writes and their combine would cost more than the parallelism gains."""
    batch = meta.get("T_bucket", meta["max_S"])
    by_occupancy = triton.next_power_of_2(-(-1024 // (batch * meta["num_kv_heads"])))
    context = meta["max_blocks"] * meta["block_size"]
    if meta.get("window", 0) > 0:
        context = min(context, meta["window"])  # keys read per sequence
    by_length = triton.next_power_of_2(-(-context // 256))
    return max(1, min(by_occupancy, by_length, 32))


def _block_n(meta: dict) -> int:
    return 64 if triton.next_power_of_2(meta["head_dim"]) <= 128 else 32


def configs(meta: dict) -> list[Config]:
    top, block_n = _splits(meta), _block_n(meta)
    splits = sorted({1, max(1, top // 4), top, min(2 * top, 64)})
    return [Config.make(num_warps=4, num_stages=2, BLOCK_N=block_n, NUM_SPLITS=s) for s in splits] + \
        [Config.make(num_warps=4, num_stages=3, BLOCK_N=block_n // 2, NUM_SPLITS=top)]


def default(meta: dict) -> Config:
    return Config.make(num_warps=4, num_stages=2, BLOCK_N=_block_n(meta), NUM_SPLITS=_splits(meta))


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    hq, hk, dh = meta["num_q_heads"], meta["num_kv_heads"], meta["head_dim"]
    group = _group(meta)
    splits = config["NUM_SPLITS"]
    block_d = triton.next_power_of_2(dh)
    stride_out = hq * dh
    # With one split the partial buffers and the semaphores are dead code; binding them to `out` keeps every
    # parameter bound without allocating scratch.
    split = splits > 1
    part_dtype, sem_dtype = ("fp32", "i32") if split else (dtypes["out"],) * 2
    part_out, part_lse, sem = (("tensor", "partial_out"), ("tensor", "partial_lse"), ("tensor", SEMAPHORES)) \
        if split else (("tensor", "out"),) * 3
    main = make_launch(
        _attention_decode_kernel,
        types={"qkv_ptr": ptr(dtypes["qkv"]), "k_cache_ptr": ptr(dtypes["k_cache"]),
               "v_cache_ptr": ptr(dtypes["v_cache"]), "seq_lens_ptr": ptr(dtypes["seq_lens"]),
               "block_tables_ptr": ptr(dtypes["block_tables"]), "out_ptr": ptr(dtypes["out"]),
               "part_out_ptr": ptr(part_dtype), "part_lse_ptr": ptr(part_dtype), "sem_ptr": ptr(sem_dtype),
               "stride_qkv": "i64", "stride_bt": "i64", "stride_out": "i64", "qk_scale": "fp32"},
        constexprs={"NUM_Q_HEADS": hq, "NUM_KV_HEADS": hk, "HEAD_DIM": dh, "GROUP": group,
                    "BLOCK_SIZE": meta["block_size"], "BLOCK_G": max(16, triton.next_power_of_2(group)),
                    "BLOCK_N": config["BLOCK_N"], "BLOCK_D": block_d, "NUM_SPLITS": splits,
                    **window_constexprs(meta)},
        args={"qkv_ptr": ("tensor", "qkv"), "k_cache_ptr": ("tensor", "k_cache"),
              "v_cache_ptr": ("tensor", "v_cache"), "seq_lens_ptr": ("tensor", "seq_lens"),
              "block_tables_ptr": ("tensor", "block_tables"), "out_ptr": ("tensor", "out"),
              "part_out_ptr": part_out, "part_lse_ptr": part_lse, "sem_ptr": sem,
              "stride_qkv": ("int", (hq + 2 * hk) * dh), "stride_bt": ("int", meta["max_blocks"]),
              "stride_out": ("int", stride_out), "qk_scale": ("float", meta["scale"] * LOG2E)},
        grid=[grid_dim(("S", 1, 1)), grid_dim(hk), grid_dim(splits)],
        config=config,
    )
    if not split:
        return Plan((main,))
    rows = meta["max_S"] * hq * splits
    return Plan((main,), scratch=(("partial_out", (rows * dh, "fp32")), ("partial_lse", (rows, "fp32")),
                                  (SEMAPHORES, (meta["max_S"] * hk, "i32"))))


# Decode steps carry one token per sequence (T == S), so the best split count depends on T.
SPEC = KernelSpec("attention_decode", configs, default, plan, tune_buckets=(1, 4, 16, 64))


def attention_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                     block_size: int, scale: float, window: int = 0, out: torch.Tensor | None = None,
                     config: Config | None = None) -> torch.Tensor:
    """qkv [S, (Hq + 2Hk) * Dh] (one token per sequence), caches [num_blocks, block_size, Hk, Dh],
    seq_lens [S] i32 (0 = padding row -> zeros), block_tables [S, max_blocks] i32 -> out [S, Hq * Dh].
    window > 0: each query sees the last ``window`` keys of its sequence only."""
    S, max_blocks = block_tables.shape
    assert qkv.shape == (S, (num_q_heads + 2 * num_kv_heads) * head_dim) and qkv.is_contiguous()
    assert k_cache.shape[1:] == (block_size, num_kv_heads, head_dim) and k_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.is_contiguous()
    assert seq_lens.shape == (S,) and block_tables.is_contiguous()
    if out is None:
        out = torch.empty(S, num_q_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    assert out.shape == (S, num_q_heads * head_dim) and out.is_contiguous()
    meta = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "block_size": block_size, "scale": scale, "window": window, "max_blocks": max_blocks, "max_T": S,
            "max_S": S}
    tensors = {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache, "seq_lens": seq_lens,
               "block_tables": block_tables, "out": out}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": S, "S": S})
    return out


def reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
              block_tables: torch.Tensor, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
              scale: float, window: int = 0) -> torch.Tensor:
    """Each row s attends, in fp32, to the first seq_lens[s] tokens of its paged cache (the last ``window`` of
    them when window > 0); length 0 gives zeros."""
    S = qkv.shape[0]
    q = qkv[:, : num_q_heads * head_dim].reshape(S, 1, num_q_heads, head_dim)
    out = torch.zeros(S, num_q_heads * head_dim, device=qkv.device)
    for s, kv_len in enumerate(seq_lens.tolist()):
        out[s] = paged_attention(q[s], k_cache, v_cache, kv_len, block_tables[s], scale, window).reshape(-1)
    return out.to(qkv.dtype)
