"""Causal varlen attention over the paged KV cache for prefill steps (GQA/MQA, cached prefixes).

Query i of sequence s sits at absolute position seq_lens[s] - q_len + i and attends to cache positions
<= that; every key and value, cached prefix and this step's tokens alike, is read from the paged cache
(kv_cache_write has already run). FlashAttention-2 style: one program owns a tile of BLOCK_M query rows
and streams the keys in BLOCK_N tiles with an online softmax in fp32 (base 2, see attention_helpers).

A tile's rows are BLOCK_Q = BLOCK_M // GROUP consecutive tokens times the GROUP q heads that share one kv
head (row r: token r // GROUP, head r % GROUP), so each K/V tile is loaded once for the whole group.
Grid axis 0 enumerates query tiles of all sequences: sequence s owns the programs from
cu_seqlens_q[s] // BLOCK_Q + s on, which leaves room for its ceil(q_len / BLOCK_Q) tiles, and
cdiv(T, BLOCK_Q) + S programs cover every sequence; a program finds its sequence by counting the
sequences that start at or before it, and programs past their sequence's last tile exit. Axis 1: kv heads.

Sliding window (USE_WINDOW, Mistral): the query at position p sees only keys at positions > p - WINDOW, as
transformers' sliding_window_overlay masks them; a tile starts its key loop at the window of its first query, so
key tiles wholly before every row's window are never loaded.

Soft-capping (USE_SOFTCAP, Gemma 2): each scaled score s becomes cap * tanh(s / cap) before the mask, as
transformers' eager attention does; the scores are in log2 units here, so SOFTCAP holds cap * log2(e).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_helpers import LOG2E, mma, online_softmax_step, paged_kv_offsets, soft_cap, softcap_constexprs
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _attention_prefill_kernel(
    qkv_ptr,  # [T, (Hq + 2 * Hk) * Dh]: q read from the first Hq * Dh columns
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hk, Dh]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hk, Dh]
    cu_seqlens_q_ptr,  # [S + 1] i32
    seq_lens_ptr,  # [S] i32
    block_tables_ptr,  # [S, max_blocks] i32
    out_ptr,  # [T, Hq * Dh]
    S,
    stride_qkv,
    stride_bt,
    stride_out,
    qk_scale,  # scale * log2(e)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    WINDOW: tl.constexpr,  # keys per query, the query's own included; read only with USE_WINDOW
    USE_SOFTCAP: tl.constexpr,
    SOFTCAP: tl.constexpr,  # cap * log2(e); read only with USE_SOFTCAP
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seqs = tl.arange(0, BLOCK_S)
    starts = tl.load(cu_seqlens_q_ptr + seqs, mask=seqs < S, other=0) // BLOCK_Q + seqs
    seq = tl.sum(((seqs < S) & (starts <= pid)).to(tl.int32), 0) - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    prefix = kv_len - q_len

    rows = tl.arange(0, BLOCK_M)
    qi = tile * BLOCK_Q + rows // GROUP  # query index within the sequence
    head = kv_head * GROUP + rows % GROUP
    # Rows past BLOCK_Q * GROUP (GROUP not a power of two) would alias the next tile's first token.
    row_ok = (rows < BLOCK_Q * GROUP) & (qi < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(qkv_ptr + tok[:, None] * stride_qkv + head[:, None] * HEAD_DIM + dims[None, :], mask=q_mask, other=0.0)
    pos = prefix + qi

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    # The tile's last query sees keys up to its own position; nothing later is read.
    kv_end = prefix + tl.minimum(q_len, (tile + 1) * BLOCK_Q)
    kv_start = 0
    if USE_WINDOW:
        # The tile's first query has the earliest window; later rows mask their own starts below.
        kv_start = tl.maximum(prefix + tile * BLOCK_Q - WINDOW + 1, 0)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Key tiles that every row of the tile sees whole (all keys at or before the tile's first position) need no
    # mask: they run first, without one (as FlashAttention's off-diagonal blocks), and only the tiles around the
    # diagonal compare positions. A window masks every tile, so with one all of them take the masked loop.
    interior_end = kv_start
    if not USE_WINDOW:
        interior_end = (prefix + tile * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    for start in range(kv_start, interior_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        offs = paged_kv_offsets(table, n, n < kv_end, BLOCK_SIZE, NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
        k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=dim_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=dim_ok[None, :], other=0.0)
        scores = mma(q, tl.trans(k)) * qk_scale
        if USE_SOFTCAP:
            scores = soft_cap(scores, SOFTCAP)
        m_i, l_i, acc = online_softmax_step(scores, m_i, l_i, acc, v)
    for start in range(interior_end, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        offs = paged_kv_offsets(table, n, n_ok, BLOCK_SIZE, NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
        kv_mask = n_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = mma(q, tl.trans(k)) * qk_scale
        if USE_SOFTCAP:
            scores = soft_cap(scores, SOFTCAP)
        visible = n_ok[None, :] & (n[None, :] <= pos[:, None])
        if USE_WINDOW:
            visible = visible & (n[None, :] > pos[:, None] - WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, m_i, l_i, acc, v)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out = out_ptr + tok[:, None] * stride_out + head[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def window_constexprs(meta: dict) -> dict:
    """USE_WINDOW / WINDOW from the node's ``window`` attr; a node without one (full causal attention) has
    USE_WINDOW False and WINDOW 0, so its binary is the windowless kernel whatever window other layers use."""
    window = meta.get("window", 0)
    assert window >= 0, f"window {window} must be >= 0 (0: full causal attention)"
    return {"USE_WINDOW": window > 0, "WINDOW": window}


def _group(meta: dict) -> int:
    hq, hk = meta["num_q_heads"], meta["num_kv_heads"]
    assert hq % hk == 0, f"num_q_heads {hq} is not a multiple of num_kv_heads {hk}"
    return hq // hk


# (BLOCK_M, BLOCK_N, num_warps, num_stages): head_dim <= 128 takes 128-row tiles; 256 needs smaller ones
# to keep the [BLOCK_M, BLOCK_D] fp32 accumulator in registers.
_SMALL_D = ((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3))
_LARGE_D = ((64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2))


def _candidates(meta: dict) -> list[Config]:
    table = _SMALL_D if triton.next_power_of_2(meta["head_dim"]) <= 128 else _LARGE_D
    # A tile must hold at least one token's whole group of q heads.
    top = max(16, triton.next_power_of_2(_group(meta)))
    return [Config.make(num_warps=w, num_stages=st, BLOCK_M=max(m, top), BLOCK_N=n) for m, n, w, st in table]


def configs(meta: dict) -> list[Config]:
    return list(dict.fromkeys(_candidates(meta)))


def default(meta: dict) -> Config:
    return _candidates(meta)[0]


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    hq, hk, dh = meta["num_q_heads"], meta["num_kv_heads"], meta["head_dim"]
    group = _group(meta)
    block_m = config["BLOCK_M"]
    block_q = block_m // group
    assert block_q >= 1, f"BLOCK_M {block_m} cannot hold a group of {group} q heads"
    launch = make_launch(
        _attention_prefill_kernel,
        types={"qkv_ptr": ptr(dtypes["qkv"]), "k_cache_ptr": ptr(dtypes["k_cache"]),
               "v_cache_ptr": ptr(dtypes["v_cache"]), "cu_seqlens_q_ptr": ptr(dtypes["cu_seqlens_q"]),
               "seq_lens_ptr": ptr(dtypes["seq_lens"]), "block_tables_ptr": ptr(dtypes["block_tables"]),
               "out_ptr": ptr(dtypes["out"]), "S": "i32", "stride_qkv": "i64", "stride_bt": "i64",
               "stride_out": "i64", "qk_scale": "fp32"},
        constexprs={"NUM_KV_HEADS": hk, "HEAD_DIM": dh, "GROUP": group, "BLOCK_SIZE": meta["block_size"],
                    "BLOCK_M": block_m, "BLOCK_Q": block_q, "BLOCK_N": config["BLOCK_N"],
                    "BLOCK_D": triton.next_power_of_2(dh), "BLOCK_S": triton.next_power_of_2(meta["max_S"]),
                    **window_constexprs(meta), **softcap_constexprs(meta, LOG2E)},
        args={"qkv_ptr": ("tensor", "qkv"), "k_cache_ptr": ("tensor", "k_cache"),
              "v_cache_ptr": ("tensor", "v_cache"), "cu_seqlens_q_ptr": ("tensor", "cu_seqlens_q"),
              "seq_lens_ptr": ("tensor", "seq_lens"), "block_tables_ptr": ("tensor", "block_tables"),
              "out_ptr": ("tensor", "out"), "S": ("sym", "S"), "stride_qkv": ("int", (hq + 2 * hk) * dh),
              "stride_bt": ("int", meta["max_blocks"]), "stride_out": ("int", hq * dh),
              "qk_scale": ("float", meta["scale"] * LOG2E)},
        grid=[grid_dim(("T", block_q, 1), ("S", 1, 1)), grid_dim(hk)],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("attention_prefill", configs, default, plan)


def attention_prefill(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, block_tables: torch.Tensor, *, num_q_heads: int, num_kv_heads: int,
                      head_dim: int, block_size: int, scale: float, window: int = 0, softcap: float = 0.0,
                      out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """qkv [T, (Hq + 2Hk) * Dh], caches [num_blocks, block_size, Hk, Dh], cu_seqlens_q [S + 1] i32,
    seq_lens [S] i32, block_tables [S, max_blocks] i32 -> out [T, Hq * Dh] in qkv's dtype.

    window > 0: each query sees its last ``window`` positions only; softcap > 0 caps the scaled scores. Rows at
    or past cu_seqlens_q[S] belong to no sequence and are left as they are.
    """
    T, S = qkv.shape[0], seq_lens.shape[0]
    max_blocks = block_tables.shape[1]
    assert qkv.shape == (T, (num_q_heads + 2 * num_kv_heads) * head_dim) and qkv.is_contiguous()
    assert k_cache.shape[1:] == (block_size, num_kv_heads, head_dim) and k_cache.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.is_contiguous()
    assert cu_seqlens_q.shape == (S + 1,) and block_tables.shape == (S, max_blocks) and block_tables.is_contiguous()
    if out is None:
        out = torch.empty(T, num_q_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    assert out.shape == (T, num_q_heads * head_dim) and out.is_contiguous()
    meta = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "block_size": block_size, "scale": scale, "window": window, "softcap": softcap, "max_blocks": max_blocks,
            "max_T": T, "max_S": S}
    tensors = {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache, "cu_seqlens_q": cu_seqlens_q,
               "seq_lens": seq_lens, "block_tables": block_tables, "out": out}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": S})
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int,
                    block_table: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """One sequence in fp32: q [q_len, Hq, Dh] at positions kv_len - q_len ..., causal over its first
    kv_len cached tokens -> [q_len, Hq, Dh]; window > 0 also hides keys at positions <= p - window from the
    query at p; softcap > 0 maps the scaled scores s to softcap * tanh(s / softcap) first. A sequence with no keys
    gives zeros."""
    q_len, hq, dh = q.shape
    if kv_len == 0:
        return torch.zeros(q_len, hq, dh, device=q.device)
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    blocks = block_table[: -(-kv_len // block_size)].long()
    k = k_cache[blocks].reshape(-1, hk, dh)[:kv_len].float().repeat_interleave(hq // hk, dim=1)
    v = v_cache[blocks].reshape(-1, hk, dh)[:kv_len].float().repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    keys = torch.arange(kv_len, device=q.device)[None, :]
    hidden = keys > pos[:, None]
    if window > 0:
        hidden |= keys <= pos[:, None] - window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
              seq_lens: torch.Tensor, block_tables: torch.Tensor, *, num_q_heads: int, num_kv_heads: int,
              head_dim: int, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Sequence by sequence in fp32 from the cache (window and softcap as in paged_attention); rows outside every
    sequence come out as zeros."""
    T = qkv.shape[0]
    out = torch.zeros(T, num_q_heads, head_dim, device=qkv.device)
    q = qkv[:, : num_q_heads * head_dim].reshape(T, num_q_heads, head_dim)
    cu = cu_seqlens_q.tolist()
    for s, kv_len in enumerate(seq_lens.tolist()):
        lo, hi = cu[s], cu[s + 1]
        out[lo:hi] = paged_attention(q[lo:hi], k_cache, v_cache, kv_len, block_tables[s], scale, window, softcap)
    return out.reshape(T, -1).to(qkv.dtype)
