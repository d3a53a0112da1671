"""Rotary position embedding, in place on the q and k heads of the fused qkv buffer.

Row layout (docs/ops.md): Hq q heads, Hk k heads, Hk v heads, each Dh wide. The Hq + Hk q and k heads are
contiguous, so one program takes a [BLOCK_H, *] tile of them for one token; v is never written.

Each rotated pair (x1, x2) with frequency index i in [0, Dr/2) becomes
    (x1 * cos_i - x2 * sin_i,  x2 * cos_i + x1 * sin_i)
with neox pairing x1 = x[i], x2 = x[i + Dr/2] (HF Llama's rotate_half) or GPT-J pairing x1 = x[2i],
x2 = x[2i + 1] (HF GPT-J's rotate_every_two). Both halves of each pair are loaded as separate tiles, so
no lane shuffles are needed and any Dh works (80, 96: next_power_of_2 tiles plus masks). The table row
cos_sin[pos] = [cos_0 .. cos_{Dr/2-1}, sin_0 .. sin_{Dr/2-1}] is built by the compiler with any rope
scaling (llama3, linear) already applied. Columns Dr .. Dh (partial rotary) pass through unrotated.

With USE_QK_NORM (Qwen3) every q head is first RMS-normalised over all Dh columns and scaled by q_norm,
every k head by k_norm; the pass-through columns then need writing back too.

With WRITE_CACHE the kernel also does kv_cache_write's job, saving a launch per layer: the tiles run over all
Hq + 2 Hk heads, and each token with slot_mapping[t] >= 0 gets its rotated k heads and its v heads (copied
as they are) stored to row slot of k_cache / v_cache. q and k are still rotated in qkv, as in the plain form:
attention reads q from there, and qkv stays a valid input to kv_cache_write. The v heads of qkv stay as they were.

Where the qkv comes from a matmul read by this op alone and no q/k norm is asked for, the compiler runs both jobs in
that matmul's epilogue instead (kernels/rope_epilogue.py, the same maths): this kernel is then Qwen3's, or a
fallback.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache_write import reference as write_reference
from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _rope_kernel(
    qkv_ptr,  # [T, (HQ + 2 * HK) * HEAD_DIM], q and k heads updated in place
    positions_ptr,  # [T] i32
    cos_sin_ptr,  # [max_pos, ROT_DIM] fp32: cos | sin
    q_norm_ptr,  # [HEAD_DIM], read only with USE_QK_NORM
    k_norm_ptr,  # [HEAD_DIM], read only with USE_QK_NORM
    slot_mapping_ptr,  # [T] i32, -1 = padding row; read only with WRITE_CACHE
    k_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM], written only with WRITE_CACHE
    v_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM], written only with WRITE_CACHE
    T,
    stride_qkv,
    eps,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    USE_QK_NORM: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next_power_of_2(ROT_DIM // 2)
    BLOCK_P: tl.constexpr,  # next_power_of_2(HEAD_DIM - ROT_DIM), at least 1
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # With WRITE_CACHE the v heads join the tiles, to be copied to v_cache as they are.
    if WRITE_CACHE:
        head_ok = heads < HQ + 2 * HK
    else:
        head_ok = heads < HQ + HK
    is_q = (heads < HQ)[:, None]
    is_v = (heads >= HQ + HK)[:, None]
    half = tl.arange(0, BLOCK_R)
    half_ok = half < ROT_DIM // 2
    if IS_NEOX:
        c1 = half
        c2 = half + ROT_DIM // 2
    else:
        c1 = 2 * half
        c2 = 2 * half + 1
    base = qkv_ptr + row * stride_qkv + heads[:, None].to(tl.int64) * HEAD_DIM  # [BLOCK_H, 1]
    rot_ok = head_ok[:, None] & half_ok[None, :]
    x1 = tl.load(base + c1[None, :], mask=rot_ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + c2[None, :], mask=rot_ok, other=0.0).to(tl.float32)
    pcols = ROT_DIM + tl.arange(0, BLOCK_P)
    pass_ok = head_ok[:, None] & (pcols < HEAD_DIM)[None, :]
    # Pass-through columns matter when the norm rescales them or the cache needs whole heads.
    if USE_QK_NORM or (WRITE_CACHE and ROT_DIM < HEAD_DIM):
        xp = tl.load(base + pcols[None, :], mask=pass_ok, other=0.0).to(tl.float32)

    if USE_QK_NORM:
        sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(xp * xp, axis=1)
        rstd = (1.0 / tl.sqrt(sq / HEAD_DIM + eps))[:, None]
        w1 = tl.where(is_q, tl.load(q_norm_ptr + c1, mask=half_ok, other=0.0)[None, :],
                      tl.load(k_norm_ptr + c1, mask=half_ok, other=0.0)[None, :]).to(tl.float32)
        w2 = tl.where(is_q, tl.load(q_norm_ptr + c2, mask=half_ok, other=0.0)[None, :],
                      tl.load(k_norm_ptr + c2, mask=half_ok, other=0.0)[None, :]).to(tl.float32)
        pcols_ok = pcols < HEAD_DIM
        wp = tl.where(is_q, tl.load(q_norm_ptr + pcols, mask=pcols_ok, other=0.0)[None, :],
                      tl.load(k_norm_ptr + pcols, mask=pcols_ok, other=0.0)[None, :]).to(tl.float32)
        # v heads (present with WRITE_CACHE) are neither normed nor rotated.
        x1 = tl.where(is_v, x1, x1 * rstd * w1)
        x2 = tl.where(is_v, x2, x2 * rstd * w2)
        xp = tl.where(is_v, xp, xp * rstd * wp)
        tl.store(base + pcols[None, :], xp.to(qkv_ptr.dtype.element_ty), mask=pass_ok & ~is_v)

    pos = tl.load(positions_ptr + row).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * ROT_DIM + half, mask=half_ok, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * ROT_DIM + ROT_DIM // 2 + half, mask=half_ok, other=0.0)[None, :]
    o1 = tl.where(is_v, x1, x1 * cos - x2 * sin)
    o2 = tl.where(is_v, x2, x2 * cos + x1 * sin)
    tl.store(base + c1[None, :], o1.to(qkv_ptr.dtype.element_ty), mask=rot_ok & ~is_v)
    tl.store(base + c2[None, :], o2.to(qkv_ptr.dtype.element_ty), mask=rot_ok & ~is_v)

    if WRITE_CACHE:
        # Cache row `slot` is [HK, HEAD_DIM] contiguous (as in kv_cache_write): kv head h starts at
        # slot * HK * HEAD_DIM + h * HEAD_DIM, whichever block the slot lies in.
        slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
        is_k = ~is_q & ~is_v
        kv_head = tl.where(is_v, heads[:, None] - HQ - HK, heads[:, None] - HQ).to(tl.int64)
        dst = slot * (HK * HEAD_DIM) + kv_head * HEAD_DIM  # [BLOCK_H, 1]
        k_ok = is_k & (slot >= 0)
        v_ok = is_v & (slot >= 0)
        tl.store(k_cache_ptr + dst + c1[None, :], o1.to(k_cache_ptr.dtype.element_ty), mask=rot_ok & k_ok)
        tl.store(k_cache_ptr + dst + c2[None, :], o2.to(k_cache_ptr.dtype.element_ty), mask=rot_ok & k_ok)
        tl.store(v_cache_ptr + dst + c1[None, :], o1.to(v_cache_ptr.dtype.element_ty), mask=rot_ok & v_ok)
        tl.store(v_cache_ptr + dst + c2[None, :], o2.to(v_cache_ptr.dtype.element_ty), mask=rot_ok & v_ok)
        if ROT_DIM < HEAD_DIM:
            tl.store(k_cache_ptr + dst + pcols[None, :], xp.to(k_cache_ptr.dtype.element_ty), mask=pass_ok & k_ok)
            tl.store(v_cache_ptr + dst + pcols[None, :], xp.to(v_cache_ptr.dtype.element_ty), mask=pass_ok & v_ok)


def _check(meta: dict) -> None:
    Dh, Dr = meta["head_dim"], meta["rotary_dim"]
    if not (0 < Dr <= Dh and Dr % 2 == 0):
        raise ValueError(f"rope: rotary_dim={Dr} must be even and in (0, head_dim={Dh}]")


def _block_r(meta: dict) -> int:
    return triton.next_power_of_2(meta["rotary_dim"] // 2)


def _heads(meta: dict) -> int:
    """Heads one token's programs cover: q and k, plus v when they go to the cache."""
    return meta["num_q_heads"] + meta["num_kv_heads"] * (2 if meta.get("write_cache") else 1)


def _warps(elems: int) -> int:
    return 1 if elems <= 256 else 2 if elems <= 512 else 4


def configs(meta: dict) -> list[Config]:
    heads = triton.next_power_of_2(_heads(meta))
    return [Config.make(num_warps=w, num_stages=1, BLOCK_H=bh)
            for bh, w in ((1, 1), (2, 1), (4, 2), (8, 4), (16, 4)) if bh <= heads]


def default(meta: dict) -> Config:
    # Four heads per program: a decode step (few tokens) still spreads over heads / 4 programs per token.
    bh = min(4, triton.next_power_of_2(_heads(meta)))
    return Config.make(num_warps=_warps(bh * _block_r(meta)), num_stages=1, BLOCK_H=bh)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    _check(meta)
    Hq, Hk, Dh, Dr = meta["num_q_heads"], meta["num_kv_heads"], meta["head_dim"], meta["rotary_dim"]
    qk_norm = bool(meta.get("use_qk_norm", False))
    write = bool(meta.get("write_cache", False))
    # Pointers a variant never reads are bound to qkv, so the signature stays the same for every variant.
    norm_roles = ("q_norm", "k_norm") if qk_norm else ("qkv", "qkv")
    cache_roles = ("slot_mapping", "k_cache", "v_cache") if write else ("qkv", "qkv", "qkv")
    bh = config["BLOCK_H"]
    pointers = dict(zip(("q_norm_ptr", "k_norm_ptr", "slot_mapping_ptr", "k_cache_ptr", "v_cache_ptr"),
                        norm_roles + cache_roles))
    launch = make_launch(
        _rope_kernel,
        types={"qkv_ptr": ptr(dtypes["qkv"]), "positions_ptr": ptr(dtypes["positions"]),
               "cos_sin_ptr": ptr(dtypes["cos_sin"]), **{p: ptr(dtypes[r]) for p, r in pointers.items()},
               "T": "i32", "stride_qkv": "i64", "eps": "fp32"},
        constexprs={"HQ": Hq, "HK": Hk, "HEAD_DIM": Dh, "ROT_DIM": Dr, "IS_NEOX": bool(meta["is_neox"]),
                    "USE_QK_NORM": qk_norm, "WRITE_CACHE": write, "BLOCK_H": bh, "BLOCK_R": _block_r(meta),
                    "BLOCK_P": triton.next_power_of_2(max(Dh - Dr, 1)), "USE_PDL": False},
        args={"qkv_ptr": ("tensor", "qkv"), "positions_ptr": ("tensor", "positions"),
              "cos_sin_ptr": ("tensor", "cos_sin"), **{p: ("tensor", r) for p, r in pointers.items()},
              "T": ("sym", "T"), "stride_qkv": ("int", meta.get("stride_qkv", (Hq + 2 * Hk) * Dh)),
              "eps": ("float", meta.get("eps", 1e-6))},
        grid=[grid_dim(("T", 1, 1)), grid_dim(-(-_heads(meta) // bh))],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("rope", configs, default, plan)


def rope(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, q_norm: torch.Tensor | None = None,
         k_norm: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
         k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, *, num_q_heads: int,
         num_kv_heads: int, head_dim: int, rotary_dim: int, is_neox: bool, use_qk_norm: bool = False,
         eps: float = 1e-6, write_cache: bool = False,
         config: Config | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate (and with use_qk_norm first normalise) the q and k heads of qkv in place, through the kernel.

    qkv [T, (Hq + 2 Hk) * Dh], positions [T] i32, cos_sin [max_pos, Dr] fp32, q_norm / k_norm [Dh].
    With write_cache, also write each token's rotated k heads and its v heads to k_cache / v_cache
    [num_blocks, block_size, Hk, Dh] at slot_mapping [T] i32 (-1: skip), and return (qkv, k_cache, v_cache);
    otherwise return qkv.
    """
    T, width = qkv.shape
    assert width == (num_q_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1, "qkv row has the wrong width"
    assert positions.shape == (T,) and positions.dtype == torch.int32, "positions must be [T] int32"
    assert cos_sin.shape[1] == rotary_dim and cos_sin.is_contiguous(), "cos_sin must be a contiguous [max_pos, Dr]"
    tensors = {"qkv": qkv, "positions": positions, "cos_sin": cos_sin}
    if use_qk_norm:
        assert q_norm is not None and k_norm is not None and q_norm.shape == k_norm.shape == (head_dim,)
        tensors |= {"q_norm": q_norm, "k_norm": k_norm}
    if write_cache:
        assert slot_mapping is not None and slot_mapping.shape == (T,) and slot_mapping.dtype == torch.int32
        assert k_cache is not None and v_cache is not None and k_cache.shape == v_cache.shape
        assert k_cache.shape[2:] == (num_kv_heads, head_dim) and k_cache.is_contiguous() and v_cache.is_contiguous()
        tensors |= {"slot_mapping": slot_mapping, "k_cache": k_cache, "v_cache": v_cache}
    meta = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "rotary_dim": rotary_dim, "is_neox": is_neox, "use_qk_norm": use_qk_norm, "eps": eps,
            "write_cache": write_cache, "max_pos": cos_sin.shape[0], "stride_qkv": qkv.stride(0), "max_T": T,
            "max_S": 1}
    dtypes = {r: dtype_name(t) for r, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return (qkv, k_cache, v_cache) if write_cache else qkv


def reference(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, q_norm: torch.Tensor | None = None,
              k_norm: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
              k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, *, num_q_heads: int,
              num_kv_heads: int, head_dim: int, rotary_dim: int, is_neox: bool, use_qk_norm: bool = False,
              eps: float = 1e-6,
              write_cache: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place on qkv [T, (Hq + 2 Hk) * Dh]: q and k heads (optionally RMS-normed per head) rotated; returns qkv.

    With write_cache, then kv_cache_write: k heads (rotated) and v heads of every token with slot_mapping >= 0
    go to that row of k_cache / v_cache [num_blocks, block_size, Hk, Dh], in place; returns (qkv, k_cache, v_cache).
    """
    T = qkv.shape[0]
    Hqk, Dh, half = num_q_heads + num_kv_heads, head_dim, rotary_dim // 2
    x = qkv[:, :Hqk * Dh].float().reshape(T, Hqk, Dh)
    if use_qk_norm:
        w = torch.cat([q_norm.float().expand(num_q_heads, Dh), k_norm.float().expand(num_kv_heads, Dh)])
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    table = cos_sin.float()[positions.long()]
    cos, sin = table[:, None, :half], table[:, None, half:]
    rot = x[..., :rotary_dim]
    x1, x2 = (rot[..., :half], rot[..., half:]) if is_neox else (rot[..., 0::2], rot[..., 1::2])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.cat([o1, o2], -1) if is_neox else torch.stack([o1, o2], -1).flatten(-2)
    x = torch.cat([rotated, x[..., rotary_dim:]], -1)
    qkv[:, :Hqk * Dh] = x.reshape(T, Hqk * Dh).to(qkv.dtype)
    if not write_cache:
        return qkv
    # The fused form is rope followed by kv_cache_write on the rotated qkv, by definition.
    write_reference(qkv, slot_mapping, k_cache, v_cache, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                    head_dim=head_dim)
    return qkv, k_cache, v_cache
