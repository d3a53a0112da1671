"""The quantized builds' newer kernel variants on the GPU (Triton JIT), at model sizes, against the references:
rms_norm_linear with the norm weight applied to x (USE_NORM_W) over int8 / int4 weights, and the quantized embedding
table and lm_head (embedding / logits with W_INT8 / W_INT4).

Written without a GPU at hand (CPU-tested through the interpreter, tests/kernels/test_norm_w.py and
tests/kernels/test_quant_tables.py): this file's first run is their first run on a GPU. As in
tests/gpu/test_int4_matmul_gpu.py, a tensor-core (USE_DOT) variant rounds the dequantized weight (and, with
USE_NORM_W, x * norm_w) to the activation dtype before the product, so it is compared with the reference on those
rounded operands; the broadcast variants with the fp32 ones.
"""

import pytest
import torch

from kernels import embedding as embedding_op
from kernels import logits as logits_op
from kernels import rms_norm_linear as rnl_op
from kernels.weight_quant import dequantize, quantize_int4, quantize_int8

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
EPS = 1e-5


def _quantized(scheme: str, N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, generator=g, device="cuda") * torch.exp(0.5 * torch.randn(N, 1, generator=g, device="cuda"))
    return quantize_int8(w / K**0.5) if scheme == "int8" else quantize_int4(w / K**0.5, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 3, 16, 300])
@pytest.mark.parametrize("K,N,act", [(4096, 6144, None), (4096, 2 * 14336, "silu_mul"), (2048, 2 * 5632, "silu_mul")])
def test_rms_norm_linear_norm_w(dtype, scheme, T, K, N, act):
    g = torch.Generator(device="cuda").manual_seed(T + K)
    x = (torch.randn(T, K, generator=g, device="cuda") * 3).to(dtype)
    norm_w = (1 + 0.5 * torch.randn(K, generator=g, device="cuda")).to(dtype)
    q, scale = _quantized(scheme, N, K, seed=N)
    meta = {"K": K, "N": N, "eps": EPS, "has_bias": False, "act": act, "stride_x": K, "max_T": T, "max_S": 1,
            "T_bucket": T, "quant": scheme, "use_norm_w": True, **({"group_size": 128} if scheme == "int4" else {})}
    config = rnl_op.default(meta)
    out = torch.full((T, N // 2 if act else N), float("nan"), dtype=dtype, device="cuda")
    rnl_op.rms_norm_linear(x, q, None, scale=scale, norm_w=norm_w, eps=EPS, act=act, out=out, config=config)
    # The kernel's operands (kernels/matmul_helpers.apply_norm_w): x * norm_w in fp32, rounded back to the activation
    # dtype in every layout; the tensor-core layouts also round the dequantized weight to it.
    xs, w = (x.float() * norm_w.float()).to(dtype).float(), dequantize(q, scale)
    if config["USE_DOT"] and scheme == "int4":
        # int4 is dequantized per group before the product; int8 multiplies exact q and scales the accumulator.
        w = w.to(dtype).float()
    want = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS) * (xs @ w.T)  # rstd over the raw x
    if act:
        want = torch.nn.functional.silu(want[:, 0::2]) * want[:, 1::2]
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("R", [1, 4, 16, 100])
def test_quantized_logits(dtype, scheme, R):
    V, D, T = 128256, 4096, max(R, 7)
    g = torch.Generator(device="cuda").manual_seed(R)
    x = (torch.randn(T, D, generator=g, device="cuda") * 3).to(dtype)
    norm_w = (1 + 0.5 * torch.randn(D, generator=g, device="cuda")).to(dtype)
    idx = torch.randperm(T, generator=g, device="cuda")[:R].to(torch.int32)
    q, scale = _quantized(scheme, V, D, seed=R + 1)
    out = logits_op.logits(x, norm_w, q, idx, eps=EPS, weight_scale=scale)
    meta = {"D": D, "V": V, "eps": EPS, "max_T": T, "max_S": R, "T_bucket": max(T, R), "quant": scheme,
            **({"group_size": 128} if scheme == "int4" else {})}
    # tl.dot variants round the dequantized weight to the activation dtype; the broadcast GEMV does not.
    weight = dequantize(q, scale).to(dtype) if logits_op.default(meta)["USE_DOT"] else dequantize(q, scale)
    want = logits_op.reference(x, norm_w, weight, idx, eps=EPS)
    torch.testing.assert_close(out, want, atol=5 * TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_embedding(dtype, scheme):
    V, D = 128256, 4096
    q, scale = _quantized(scheme, V, D, seed=5)
    ids = torch.tensor([0, 17, V - 1, 4096, 128000, -1, V], dtype=torch.int32, device="cuda")
    out = embedding_op.embedding(ids, q, weight_scale=scale, out_dtype={torch.bfloat16: "bf16",
                                                                        torch.float16: "fp16"}[dtype])
    valid = ids[:5]
    want = embedding_op.reference(valid, q, scale, out_dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    # One fp32 dequantization and one rounding on both sides (the kernel's q * scale + min may be one FMA: an ulp).
    torch.testing.assert_close(out[:5].float(), want.float(), atol=1e-6, rtol=TOL[dtype])
    assert torch.equal(out[5:], torch.zeros_like(out[5:]))
