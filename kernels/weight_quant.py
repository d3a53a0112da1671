"""Weight-only quantization schemes of the matmul weights (`linear`, `rms_norm_linear`; node attr `quant`).

int8: symmetric per output channel. Row n of W [N, K] gets scale[n] = max_k |W[n, k]| / 127 (fp32) and
q[n, k] = round(W[n, k] / scale[n]) clamped to [-127, 127], stored int8; W ~= q * scale[:, None]. A row of zeros
gets scale 1 (and q 0), so no division by zero and the row dequantizes to zeros. Because each row has its own
scale, permuting or concatenating rows commutes with quantizing them: the compiler quantizes the rows the kernel
reads, after every pass that folds, merges or reorders them.

int4: asymmetric per group of G (32, 64 or 128; node attr `group_size`) consecutive k of one row. Group g of row n,
W[n, gG:(g+1)G], gets min = its smallest value and scale = (max - min) / 15 (both fp32; a constant group gets scale
1), q = round((W - min) / scale) clamped to [0, 15], and W ~= q * scale + min (the min is stored, not an integer
zero point, so both ends of every group are exact up to fp32 rounding). Two q per byte: byte j of row n holds
k = 2j in its low nibble and k = 2j + 1 in its high nibble, w [N, K / 2] uint8, so a tile's K range is a
contiguous run of bytes (16-byte loads along K). scale [N, K / G, 2] fp32 holds (scale, min) of each group side by
side: one tensor, one kernel pointer, both read by one load. Per-row groups commute with row permutations and
merges just as int8's scales do.

int8_group: int8 q [N, K] with an fp32 (scale, min) pair per group of G (16 or 32; node attr `group_size`) along K,
scale [N, K / G, 2] as int4's, and W = q * scale + min. Nothing quantizes to it at compile time: it is the layout a
GGUF's 5- to 8-bit blocks are repacked into, exactly (compiler/frontends/gguf_blocks.py: Q8_0 q with its block scale
and min 0, Q5_K's 5-bit q with its sub-block scale and min, Q6_K's q - 32 with d times its 16-value sub-scale).
Told from int8 by the scale's rank, from int4 by the dtype of w.
"""

from __future__ import annotations

import torch

QUANT_SCHEMES = ("none", "int8", "int4", "int8_group")
INT8_MAX = 127
INT4_MAX = 15
INT4_GROUP_SIZES = (32, 64, 128)
INT4_DEFAULT_GROUP_SIZE = 128
INT8_GROUP_SIZES = (16, 32)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> (q [N, K] int8, scale [N] fp32), computed in fp32."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype, K a multiple of group_size) -> (packed [N, K / 2] uint8, scale [N, K / G, 2] fp32
    of (scale, min) pairs), computed in fp32."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4: K = {K} is not a multiple of the group size {group_size}")
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scale = torch.where(hi > lo, (hi - lo) / INT4_MAX, torch.ones_like(lo))
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, INT4_MAX).to(torch.uint8).reshape(N, K)
    return pack_int4(q), torch.stack([scale, lo], dim=2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed [N, K / 2] uint8 -> q [N, K] uint8 in [0, 15] (low nibble: even k, high nibble: odd k)."""
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] (any integer dtype) -> packed [N, K / 2] uint8, the inverse of unpack_int4."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def is_int4(w: torch.Tensor, scale: torch.Tensor | None) -> bool:
    return scale is not None and w.dtype == torch.uint8 and scale.dim() == 3


def scheme_of(w: torch.Tensor, scale: torch.Tensor | None) -> tuple[str, int | None]:
    """(scheme, group size or None) of a weight and its scale, told apart by dtype and rank."""
    if scale is None:
        return "none", None
    if scale.dim() != 3:
        return "int8", None
    packed = w.dtype == torch.uint8
    return ("int4" if packed else "int8_group"), w.shape[1] * (2 if packed else 1) // scale.shape[1]


def dequantize(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weight a matmul computes with: w itself; with a scale [N] (int8 w) q * scale[:, None]; with a
    scale [N, K / G, 2] (packed int4 w, or int8 w: int8_group) q * scale + min per group."""
    if scale is None:
        return w.float()
    if scale.dim() == 3:
        q = (unpack_int4(w) if w.dtype == torch.uint8 else w).float()
        N, K = q.shape
        s = scale.float()
        group = K // s.shape[1]
        return (q.reshape(N, -1, group) * s[..., 0:1] + s[..., 1:2]).reshape(N, K)
    return w.float() * scale.float()[:, None]
