"""Paged attention for decode steps: one query token per sequence, split-KV over the cached context.

Decode attention is a pure stream over the KV cache, so each K/V tile is read exactly once: one program
owns (sequence, kv head, split) and computes all GROUP q heads that share the kv head, as the rows of a
tl.dot padded to BLOCK_G >= 16 rows (tensor cores need 16; the padding rows cost no memory traffic).
A sequence's key tiles are cut into NUM_SPLITS contiguous ranges so that short batches still fill the
GPU; each split writes its normalised partial output and log-sum-exp (base 2) to fp32 scratch and a
second launch combines them: out = sum_j 2^(lse_j - M) o_j / sum_j 2^(lse_j - M), M = max_j lse_j.
With NUM_SPLITS == 1 the first launch writes the output itself and there is no second launch.
(A one-launch form, the last split to finish combining through a semaphore as split-K matmuls do, ran slower on
an H200: 184 µs of attention per TinyLlama batch-1 step against 65 + 29 µs for these two launches, its combine a
serial loop of NUM_SPLITS round trips to L2; benchmarks/results/decode.md, 2026-12-02.)
A padding row (seq_len 0) reads no key, its splits report lse = -inf, and its output is zeros.

Sliding window (USE_WINDOW): the query at position seq_len - 1 sees the last WINDOW keys only, so the splits
divide the tiles of [seq_len - WINDOW, seq_len) and blocks before the window are never loaded; a window that
starts inside a cache block needs no mask, as the first tile starts at the window's first key.

Soft-capping (USE_SOFTCAP, Gemma 2): as in attention_prefill, SOFTCAP = cap * log2(e) caps the log2-unit scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_helpers import (
    LOG2E,
    max_along,
    mma,
    online_softmax_step,
    paged_kv_offsets,
    soft_cap,
    softcap_constexprs,
)
from kernels.attention_prefill import paged_attention, window_constexprs
from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


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
    USE_SOFTCAP: tl.constexpr,
    SOFTCAP: tl.constexpr,  # cap * log2(e); read only with USE_SOFTCAP
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
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
        scores = mma(q, tl.trans(k)) * qk_scale
        if USE_SOFTCAP:
            scores = soft_cap(scores, SOFTCAP)
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, m_i, l_i, acc, v)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        out = out_ptr + seq * stride_out + head[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part = (seq * NUM_Q_HEADS + head) * NUM_SPLITS + split  # [BLOCK_G] row of the scratch
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g < GROUP)


@triton.jit
def _attention_decode_reduce_kernel(
    part_out_ptr,  # [max_S, Hq, NUM_SPLITS, Dh] fp32
    part_lse_ptr,  # [max_S, Hq, NUM_SPLITS] fp32
    out_ptr,  # [S, Hq * Dh]
    stride_out,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    j = tl.arange(0, BLOCK_SPLITS)
    j_ok = j < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    part = (seq * NUM_Q_HEADS + head) * NUM_SPLITS + j
    lse = tl.load(part_lse_ptr + part, mask=j_ok, other=float("-inf"))
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=j_ok[:, None] & dim_ok[None, :],
                other=0.0)
    m = max_along(lse, 0)
    # Empty splits (and every split of a padding row) have lse = -inf and weight exactly 0.
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_out + head * HEAD_DIM + dims, res.to(out_ptr.dtype.element_ty), mask=dim_ok)


def _group(meta: dict) -> int:
    hq, hk = meta["num_q_heads"], meta["num_kv_heads"]
    assert hq % hk == 0, f"num_q_heads {hq} is not a multiple of num_kv_heads {hk}"
    return hq // hk


def _splits(meta: dict) -> int:
    """Enough (sequence, kv head, split) programs to fill a big GPU several times over (~1024: 132 SMs
    on an H100, 304 CUs on an MI300X), but no split shorter than 256 tokens of context, where the
    second launch and the partial writes would cost more than the parallelism gains."""
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
    # With one split the partial buffers are dead code; binding them to `out` keeps every parameter bound
    # without allocating scratch.
    part_dtype = "fp32" if splits > 1 else dtypes["out"]
    part_out, part_lse = (("tensor", "partial_out"), ("tensor", "partial_lse")) if splits > 1 \
        else (("tensor", "out"), ("tensor", "out"))
    main = make_launch(
        _attention_decode_kernel,
        types={"qkv_ptr": ptr(dtypes["qkv"]), "k_cache_ptr": ptr(dtypes["k_cache"]),
               "v_cache_ptr": ptr(dtypes["v_cache"]), "seq_lens_ptr": ptr(dtypes["seq_lens"]),
               "block_tables_ptr": ptr(dtypes["block_tables"]), "out_ptr": ptr(dtypes["out"]),
               "part_out_ptr": ptr(part_dtype), "part_lse_ptr": ptr(part_dtype), "stride_qkv": "i64",
               "stride_bt": "i64", "stride_out": "i64", "qk_scale": "fp32"},
        constexprs={"NUM_Q_HEADS": hq, "NUM_KV_HEADS": hk, "HEAD_DIM": dh, "GROUP": group,
                    "BLOCK_SIZE": meta["block_size"], "BLOCK_G": max(16, triton.next_power_of_2(group)),
                    "BLOCK_N": config["BLOCK_N"], "BLOCK_D": block_d, "NUM_SPLITS": splits,
                    **window_constexprs(meta), **softcap_constexprs(meta, LOG2E), "USE_PDL": False},
        args={"qkv_ptr": ("tensor", "qkv"), "k_cache_ptr": ("tensor", "k_cache"),
              "v_cache_ptr": ("tensor", "v_cache"), "seq_lens_ptr": ("tensor", "seq_lens"),
              "block_tables_ptr": ("tensor", "block_tables"), "out_ptr": ("tensor", "out"),
              "part_out_ptr": part_out, "part_lse_ptr": part_lse, "stride_qkv": ("int", (hq + 2 * hk) * dh),
              "stride_bt": ("int", meta["max_blocks"]), "stride_out": ("int", stride_out),
              "qk_scale": ("float", meta["scale"] * LOG2E)},
        grid=[grid_dim(("S", 1, 1)), grid_dim(hk), grid_dim(splits)],
        config=config,
    )
    if splits == 1:
        return Plan((main,))
    reduce = make_launch(
        _attention_decode_reduce_kernel,
        types={"part_out_ptr": ptr("fp32"), "part_lse_ptr": ptr("fp32"), "out_ptr": ptr(dtypes["out"]),
               "stride_out": "i64"},
        constexprs={"NUM_Q_HEADS": hq, "HEAD_DIM": dh, "NUM_SPLITS": splits,
                    "BLOCK_SPLITS": triton.next_power_of_2(splits), "BLOCK_D": block_d, "USE_PDL": False},
        args={"part_out_ptr": ("tensor", "partial_out"), "part_lse_ptr": ("tensor", "partial_lse"),
              "out_ptr": ("tensor", "out"), "stride_out": ("int", stride_out)},
        grid=[grid_dim(("S", 1, 1)), grid_dim(hq)],
        config=Config.make(num_warps=1 if block_d <= 128 else 2, num_stages=1),
    )
    rows = meta["max_S"] * hq * splits
    return Plan((main, reduce), scratch=(("partial_out", (rows * dh, "fp32")), ("partial_lse", (rows, "fp32"))))


# Decode steps carry one token per sequence (T == S), so the best split count depends on T.
SPEC = KernelSpec("attention_decode", configs, default, plan, tune_buckets=(1, 4, 16, 64))


def attention_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                     block_size: int, scale: float, window: int = 0, softcap: float = 0.0,
                     out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """qkv [S, (Hq + 2Hk) * Dh] (one token per sequence), caches [num_blocks, block_size, Hk, Dh],
    seq_lens [S] i32 (0 = padding row -> zeros), block_tables [S, max_blocks] i32 -> out [S, Hq * Dh].
    window > 0: each query sees the last ``window`` keys of its sequence only; softcap > 0 caps the scaled scores."""
    S, max_blocks = block_tables.shape
    assert qkv.shape == (S, (num_q_heads + 2 * num_kv_heads) * head_dim) and qkv.is_contiguous()
    assert k_cache.shape[1:] == (block_size, num_kv_heads, head_dim) and k_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.is_contiguous()
    assert seq_lens.shape == (S,) and block_tables.is_contiguous()
    if out is None:
        out = torch.empty(S, num_q_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    assert out.shape == (S, num_q_heads * head_dim) and out.is_contiguous()
    meta = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "block_size": block_size, "scale": scale, "window": window, "softcap": softcap, "max_blocks": max_blocks,
            "max_T": S, "max_S": S}
    tensors = {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache, "seq_lens": seq_lens,
               "block_tables": block_tables, "out": out}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": S, "S": S})
    return out


def reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
              block_tables: torch.Tensor, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
              scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Each row s attends, in fp32, to the first seq_lens[s] tokens of its paged cache (the last ``window`` of
    them when window > 0, scores soft-capped when softcap > 0); length 0 gives zeros."""
    S = qkv.shape[0]
    q = qkv[:, : num_q_heads * head_dim].reshape(S, 1, num_q_heads, head_dim)
    out = torch.zeros(S, num_q_heads * head_dim, device=qkv.device)
    for s, kv_len in enumerate(seq_lens.tolist()):
        out[s] = paged_attention(q[s], k_cache, v_cache, kv_len, block_tables[s], scale, window,
                                 softcap).reshape(-1)
    return out.to(qkv.dtype)
