"""Rotary position embedding, in place on the q and k heads of the fused qkv buffer.

Row layout (docs/ops.md): Hq q heads, Hk k heads, Hk v heads, each Dh wide. The Hq + Hk q and k heads are
contiguous, so one program takes a [BLOCK_H, *] tile of them for one token; v is never touched.

Each rotated pair (x1, x2) with frequency index i in [0, Dr/2) becomes
    (x1 * cos_i - x2 * sin_i,  x2 * cos_i + x1 * sin_i)
with neox pairing x1 = x[i], x2 = x[i + Dr/2] (HF Llama's rotate_half) or GPT-J pairing x1 = x[2i],
x2 = x[2i + 1] (HF GPT-J's rotate_every_two). Both halves of each pair are loaded as separate tiles, so
no lane shuffles are needed and any Dh works (80, 96: next_power_of_2 tiles plus masks). The table row
cos_sin[pos] = [cos_0 .. cos_{Dr/2-1}, sin_0 .. sin_{Dr/2-1}] is built by the compiler with any rope
scaling (llama3, linear) already applied. Columns Dr .. Dh (partial rotary) pass through unrotated.

With USE_QK_NORM (Qwen3) every q head is first RMS-normalised over all Dh columns and scaled by q_norm,
every k head by k_norm; the pass-through columns then need writing back too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _rope_kernel(
    qkv_ptr,  # [T, (HQ + 2 * HK) * HEAD_DIM], q and k heads updated in place
    positions_ptr,  # [T] i32
    cos_sin_ptr,  # [max_pos, ROT_DIM] fp32: cos | sin
    q_norm_ptr,  # [HEAD_DIM], read only with USE_QK_NORM
    k_norm_ptr,  # [HEAD_DIM], read only with USE_QK_NORM
    T,
    stride_qkv,
    eps,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    USE_QK_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next_power_of_2(ROT_DIM // 2)
    BLOCK_P: tl.constexpr,  # next_power_of_2(HEAD_DIM - ROT_DIM), at least 1
):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < HQ + HK
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

    if USE_QK_NORM:
        pcols = ROT_DIM + tl.arange(0, BLOCK_P)
        pass_ok = head_ok[:, None] & (pcols < HEAD_DIM)[None, :]
        xp = tl.load(base + pcols[None, :], mask=pass_ok, other=0.0).to(tl.float32)
        sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(xp * xp, axis=1)
        rstd = (1.0 / tl.sqrt(sq / HEAD_DIM + eps))[:, None]
        is_q = (heads < HQ)[:, None]
        w1 = tl.where(is_q, tl.load(q_norm_ptr + c1, mask=half_ok, other=0.0)[None, :],
                      tl.load(k_norm_ptr + c1, mask=half_ok, other=0.0)[None, :]).to(tl.float32)
        w2 = tl.where(is_q, tl.load(q_norm_ptr + c2, mask=half_ok, other=0.0)[None, :],
                      tl.load(k_norm_ptr + c2, mask=half_ok, other=0.0)[None, :]).to(tl.float32)
        pcols_ok = pcols < HEAD_DIM
        wp = tl.where(is_q, tl.load(q_norm_ptr + pcols, mask=pcols_ok, other=0.0)[None, :],
                      tl.load(k_norm_ptr + pcols, mask=pcols_ok, other=0.0)[None, :]).to(tl.float32)
        x1 = x1 * rstd * w1
        x2 = x2 * rstd * w2
        tl.store(base + pcols[None, :], (xp * rstd * wp).to(qkv_ptr.dtype.element_ty), mask=pass_ok)

    pos = tl.load(positions_ptr + row).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * ROT_DIM + half, mask=half_ok, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * ROT_DIM + ROT_DIM // 2 + half, mask=half_ok, other=0.0)[None, :]
    tl.store(base + c1[None, :], (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty), mask=rot_ok)
    tl.store(base + c2[None, :], (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty), mask=rot_ok)


def _check(meta: dict) -> None:
    Dh, Dr = meta["head_dim"], meta["rotary_dim"]
    if not (0 < Dr <= Dh and Dr % 2 == 0):
        raise ValueError(f"rope: rotary_dim={Dr} must be even and in (0, head_dim={Dh}]")


def _block_r(meta: dict) -> int:
    return triton.next_power_of_2(meta["rotary_dim"] // 2)


def _warps(elems: int) -> int:
    return 1 if elems <= 256 else 2 if elems <= 512 else 4


def configs(meta: dict) -> list[Config]:
    heads = triton.next_power_of_2(meta["num_q_heads"] + meta["num_kv_heads"])
    return [Config.make(num_warps=w, num_stages=1, BLOCK_H=bh)
            for bh, w in ((1, 1), (2, 1), (4, 2), (8, 4), (16, 4)) if bh <= heads]


def default(meta: dict) -> Config:
    # Four heads per program: a decode step (few tokens) still spreads over (Hq + Hk) / 4 programs per token.
    bh = min(4, triton.next_power_of_2(meta["num_q_heads"] + meta["num_kv_heads"]))
    return Config.make(num_warps=_warps(bh * _block_r(meta)), num_stages=1, BLOCK_H=bh)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    _check(meta)
    Hq, Hk, Dh, Dr = meta["num_q_heads"], meta["num_kv_heads"], meta["head_dim"], meta["rotary_dim"]
    qk_norm = bool(meta.get("use_qk_norm", False))
    # Without q/k norm the weight pointers are never read; qkv stands in so the signature stays fixed.
    norm_roles = ("q_norm", "k_norm") if qk_norm else ("qkv", "qkv")
    bh = config["BLOCK_H"]
    launch = make_launch(
        _rope_kernel,
        types={"qkv_ptr": ptr(dtypes["qkv"]), "positions_ptr": ptr(dtypes["positions"]),
               "cos_sin_ptr": ptr(dtypes["cos_sin"]), "q_norm_ptr": ptr(dtypes[norm_roles[0]]),
               "k_norm_ptr": ptr(dtypes[norm_roles[1]]), "T": "i32", "stride_qkv": "i64", "eps": "fp32"},
        constexprs={"HQ": Hq, "HK": Hk, "HEAD_DIM": Dh, "ROT_DIM": Dr, "IS_NEOX": bool(meta["is_neox"]),
                    "USE_QK_NORM": qk_norm, "BLOCK_H": bh, "BLOCK_R": _block_r(meta),
                    "BLOCK_P": triton.next_power_of_2(max(Dh - Dr, 1))},
        args={"qkv_ptr": ("tensor", "qkv"), "positions_ptr": ("tensor", "positions"),
              "cos_sin_ptr": ("tensor", "cos_sin"), "q_norm_ptr": ("tensor", norm_roles[0]),
              "k_norm_ptr": ("tensor", norm_roles[1]), "T": ("sym", "T"),
              "stride_qkv": ("int", meta.get("stride_qkv", (Hq + 2 * Hk) * Dh)),
              "eps": ("float", meta.get("eps", 1e-6))},
        grid=[grid_dim(("T", 1, 1)), grid_dim(-(-(Hq + Hk) // bh))],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("rope", configs, default, plan)


def rope(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, q_norm: torch.Tensor | None = None,
         k_norm: torch.Tensor | None = None, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
         rotary_dim: int, is_neox: bool, use_qk_norm: bool = False, eps: float = 1e-6,
         config: Config | None = None) -> torch.Tensor:
    """Rotate (and with use_qk_norm first normalise) the q and k heads of qkv in place, through the kernel.

    qkv [T, (Hq + 2 Hk) * Dh], positions [T] i32, cos_sin [max_pos, Dr] fp32, q_norm / k_norm [Dh].
    Returns qkv.
    """
    T, width = qkv.shape
    assert width == (num_q_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1, "qkv row has the wrong width"
    assert positions.shape == (T,) and positions.dtype == torch.int32, "positions must be [T] int32"
    assert cos_sin.shape[1] == rotary_dim and cos_sin.is_contiguous(), "cos_sin must be a contiguous [max_pos, Dr]"
    tensors = {"qkv": qkv, "positions": positions, "cos_sin": cos_sin}
    if use_qk_norm:
        assert q_norm is not None and k_norm is not None and q_norm.shape == k_norm.shape == (head_dim,)
        tensors |= {"q_norm": q_norm, "k_norm": k_norm}
    meta = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "rotary_dim": rotary_dim, "is_neox": is_neox, "use_qk_norm": use_qk_norm, "eps": eps,
            "max_pos": cos_sin.shape[0], "stride_qkv": qkv.stride(0), "max_T": T, "max_S": 1}
    dtypes = {r: dtype_name(t) for r, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return qkv


def reference(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, q_norm: torch.Tensor | None = None,
              k_norm: torch.Tensor | None = None, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
              rotary_dim: int, is_neox: bool, use_qk_norm: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """In place on qkv [T, (Hq + 2 Hk) * Dh]: q and k heads (optionally RMS-normed per head) rotated; returns qkv."""
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
    return qkv
