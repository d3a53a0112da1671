"""Weight-only int8 linear and rms_norm_linear on the GPU (Triton JIT) against their references at model sizes.

Written without a GPU at hand (CPU-tested through the interpreter only, tests/kernels/test_int8_matmul.py): the
first run on a GPU is this file's first run. The references dequantize (W = q * scale) and compute in fp32; the
kernels widen int8 exactly to the activation dtype for tl.dot (or fp32 for the broadcast GEMV) and scale each
column after the K-sum, so the two differ by summation order and the output rounding, as in test_matmul_gpu.py.
bf16 is the dtype that matters here: the interpreter cannot check tl.dot on bf16 at all.
"""

import pytest
import torch

from kernels import linear as linear_op
from kernels import rms_norm_linear as rnl_op
from kernels.weight_quant import quantize_int8

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-4}
# (K, N): o-proj / qkv / gate_up / down of hidden 2048 (intermediate 5632), and the 8B down-proj.
SHAPES = [(2048, 2048), (2048, 2560), (2048, 2 * 5632), (5632, 2048), (14336, 4096)]
DECODE, PREFILL = [1, 3, 16], [64, 300]
EPS = 1e-5


def _inputs(T, K, N, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(T, K, generator=g, device="cuda") * (torch.rand(T, 1, generator=g, device="cuda") + 0.5)
         ).to(dtype)
    # Rows of different magnitudes, so a scale applied to the wrong column shows; outputs stay O(1).
    w = torch.randn(N, K, generator=g, device="cuda") * torch.exp(0.5 * torch.randn(N, 1, generator=g, device="cuda"))
    q, scale = quantize_int8(w / K**0.5)
    bias = torch.randn(N, generator=g, device="cuda").to(dtype)
    residual = torch.randn(T, N, generator=g, device="cuda").to(dtype)
    return x, q, scale, bias, residual


def _poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _close(out, ref, dtype):
    assert not out.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("T", DECODE + PREFILL)
def test_int8_linear_bias_residual(T, K, N, dtype):
    x, q, scale, bias, residual = _inputs(T, K, N, dtype, seed=T + K + N)
    out = linear_op.linear(x, q, bias, residual, scale=scale, out=_poisoned(T, N, dtype=dtype))
    _close(out, linear_op.reference(x, q, bias, residual, scale=scale), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("T", DECODE + PREFILL)
@pytest.mark.parametrize("act", [None, "silu_mul", "gelu_tanh_mul"])
def test_int8_rms_norm_linear(act, T, K, N, dtype):
    x, q, scale, bias, _ = _inputs(T, K, N, dtype, seed=3 * T + K + N)
    width = N // 2 if act else N
    out = rnl_op.rms_norm_linear(x, q, bias, scale=scale, eps=EPS, act=act, out=_poisoned(T, width, dtype=dtype))
    _close(out, rnl_op.reference(x, q, bias, scale=scale, eps=EPS, act=act), dtype)


@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
@pytest.mark.parametrize("T,bucket", [(1, 1), (3, 4), (16, 16), (64, 64), (300, 2048)])
def test_int8_every_candidate_config(op, T, bucket):
    # Every config the autotuner may pick for an int8 node, split-K included (the scale applied once, by the program
    # that runs the epilogue), in bf16 at a Llama-1B qkv shape.
    K, N, dtype = 2048, 2560, torch.bfloat16
    x, q, scale, bias, residual = _inputs(T, K, N, dtype, seed=T)
    module = linear_op if op == "linear" else rnl_op
    meta = {"K": K, "N": N, "eps": EPS, "has_bias": True, "has_residual": op == "linear", "quant": "int8",
            "max_T": max(T, bucket), "max_S": 32, "T_bucket": bucket}
    configs = module.configs(meta)
    assert bucket > 4 or any(c["SPLIT_K"] > 1 for c in configs)
    for config in configs:
        if op == "linear":
            out = linear_op.linear(x, q, bias, residual, scale=scale, out=_poisoned(T, N, dtype=dtype), config=config)
            ref = linear_op.reference(x, q, bias, residual, scale=scale)
        else:
            out = rnl_op.rms_norm_linear(x, q, bias, scale=scale, eps=EPS, out=_poisoned(T, N, dtype=dtype),
                                         config=config)
            ref = rnl_op.reference(x, q, bias, scale=scale, eps=EPS)
        _close(out, ref, dtype)
