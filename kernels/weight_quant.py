"""Weight-only quantization schemes of the matmul weights (`linear`, `rms_norm_linear`; node attr `quant`).

int8: symmetric per output channel. Row n of W [N, K] gets scale[n] = max_k |W[n, k]| / 127 (fp32) and
q[n, k] = round(W[n, k] / scale[n]) clamped to [-127, 127], stored int8; W ~= q * scale[:, None]. A row of zeros
gets scale 1 (and q 0), so no division by zero and the row dequantizes to zeros. Because each row has its own
scale, permuting or concatenating rows commutes with quantizing them: the compiler quantizes the rows the kernel
reads, after every pass that folds, merges or reorders them.
"""

from __future__ import annotations

import torch

QUANT_SCHEMES = ("none", "int8")
INT8_MAX = 127


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> (q [N, K] int8, scale [N] fp32), computed in fp32."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weight a matmul computes with: w itself, or with a scale (int8 w) q * scale[:, None]."""
    return w.float() if scale is None else w.float() * scale.float()[:, None]
