"""The moe kernels with int8 / int4 experts (--quant) on the GPU, in bf16 / fp16 / fp32, against the maths on the
dequantized weights.

Each expert's matrix is quantized as a linear's weight (kernels/weight_quant.py: int8 per output channel; int4 per
group of 128 along K); the reference dequantizes it here from the schemes' definitions and runs test_moe_gpu's
fp32 maths on it, with its near-tie routing rule. Both forms (the one-token GEMVs at T = 1, the grouped tl.dot tiles
above) at Mixtral-8x7B's, Qwen3-30B-A3B's and Qwen1.5-MoE's expert shapes, and every candidate config once in bf16.
The grouped form hands the tensor cores int4 weights dequantized in fp32 and rounded once to the activation dtype,
which the maths does not: fp16's bound is loosened to 5e-3 (bf16's 2e-2 already covers its own rounding).
Run: ``python -m pytest -q -m gpu tests/gpu/test_moe_quant_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import configs, default, moe
from kernels.weight_quant import quantize_int4, quantize_int8
from tests.gpu.test_moe_gpu import CUDA, SHAPES, _check, _inputs, _maths

pytestmark = pytest.mark.gpu

GROUP = 128
TOKENS = [1, 64, 300]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _quantized(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (stored [E, N, K] i8 or [E, N, K / 2] u8, scale, the fp32 weights they stand for)."""
    qs, ss, deq = [], [], []
    for m in w:
        if scheme == "int8":
            q, s = quantize_int8(m)
            d = q.float() * s[:, None]
        else:
            q, s = quantize_int4(m, GROUP)
            nibbles = torch.stack([q & 15, q >> 4], dim=-1).flatten(-2).float()  # byte j: k = 2j low, 2j + 1 high
            N, K = nibbles.shape
            d = (nibbles.view(N, K // GROUP, GROUP) * s[..., 0:1] + s[..., 1:2]).view(N, K)
        qs.append(q)
        ss.append(s)
        deq.append(d)
    return torch.stack(qs), torch.stack(ss), torch.stack(deq)


def _case(shape, T, dtype, scheme, seed=1):
    E, top_k, D, I, renormalize, has_shared = SHAPES[shape]
    x, router, w13, w2, residual, shared, shared_gate = _inputs(E, D, I, T, dtype, seed)
    q13, s13, d13 = _quantized(w13, scheme)
    del w13
    q2, s2, d2 = _quantized(w2, scheme)
    del w2
    if not has_shared:
        shared = shared_gate = None
    want = _maths(x, router, d13, d2, residual, shared, shared_gate, top_k, renormalize)
    return (x, router, q13, q2, residual, shared, shared_gate), (s13, s2), want


def _check_quant(out, want, decisive, dtype):
    if dtype == torch.float16:
        err = (out.float() - want).norm(dim=-1) / want.norm(dim=-1)
        assert torch.isfinite(out).all() and decisive.any()
        assert float(err[decisive].max()) <= 5e-3, f"worst row relative error {float(err[decisive].max()):.2e}"
    else:
        _check(out, want, decisive, dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", ["mixtral", "qwen3-moe", "qwen2-moe"])
def test_quantized_moe_matches_the_maths(shape, T, dtype, scheme):
    E, top_k, D, I, renormalize, _ = SHAPES[shape]
    (x, router, q13, q2, residual, shared, shared_gate), (s13, s2), want = _case(shape, T, dtype, scheme)
    out = torch.full((T, D), float("nan"), dtype=dtype, device=CUDA)
    moe(x, router, q13, q2, residual, shared, shared_gate, top_k=top_k, renormalize=renormalize, w13_scale=s13,
        w2_scale=s2, out=out)
    _check_quant(out, *want, dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("bucket", [1, 16, 256])
def test_every_quantized_config_in_bf16(bucket, scheme):
    E, top_k, D, I, renormalize, _ = SHAPES["qwen3-moe"]
    meta = {"E": E, "D": D, "I": I, "top_k": top_k, "max_T": 256, "max_S": 8, "T_bucket": bucket, "quant": scheme,
            **({"group_size": GROUP} if scheme == "int4" else {})}
    (x, router, q13, q2, residual, _, _), (s13, s2), want = _case("qwen3-moe", bucket, torch.bfloat16, scheme, 11)
    for config in dict.fromkeys([*configs(meta), default(meta)]):
        out = torch.full((bucket, D), float("nan"), dtype=torch.bfloat16, device=CUDA)
        moe(x, router, q13, q2, residual, top_k=top_k, renormalize=renormalize, w13_scale=s13, w2_scale=s2, out=out,
            config=config)
        _check_quant(out, *want, torch.bfloat16)
