"""Weight-only int4 linear and rms_norm_linear on the GPU (Triton JIT) against their references at model sizes.

Written without a GPU at hand (CPU-tested through the interpreter only, tests/kernels/test_int4_matmul.py): the
first run on a GPU is this file's first run. The references dequantize (W = q * scale + min per group of G along K)
and compute in fp32; the kernels unpack the nibbles and dequantize in fp32 inside the K loop, then round the weight to
the activation dtype for tl.dot (the broadcast GEMV keeps fp32). That rounding is part of the tensor-core path's
definition, and on rows of large scale it moves an output by several of TOL (first GPU run, H200: 81 of 555 cases,
1 to 89 elements each, up to 0.068 in bf16): so a variant with USE_DOT is compared with the reference on the
dequantized weight rounded to the activation dtype, and the broadcast variants with the fp32 one. What is left is the
summation order and the output rounding. bf16 is the dtype that matters here: the interpreter cannot check tl.dot on
bf16.
"""

import pytest
import torch

from kernels import linear as linear_op
from kernels import rms_norm_linear as rnl_op
from kernels.weight_quant import dequantize, quantize_int4

pytestmark = pytest.mark.gpu

# The dequantized weight rounded to bf16 / fp16 before tl.dot adds one rounding per element over int8's exact q.
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
# (K, N): o-proj / qkv / gate_up / down of hidden 2048 (intermediate 5632), and the 8B down-proj; K multiples of 128.
SHAPES = [(2048, 2048), (2048, 2560), (2048, 2 * 5632), (5632, 2048), (14336, 4096)]
DECODE, PREFILL = [1, 3, 16], [64, 300]
GROUPS = [32, 128]
EPS = 1e-5


def _inputs(T, K, N, dtype, group, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(T, K, generator=g, device="cuda") * (torch.rand(T, 1, generator=g, device="cuda") + 0.5)
         ).to(dtype)
    # Rows of different magnitudes, so a (scale, min) applied to the wrong row or group shows; outputs stay O(1).
    w = torch.randn(N, K, generator=g, device="cuda") * torch.exp(0.5 * torch.randn(N, 1, generator=g, device="cuda"))
    q, scale = quantize_int4(w / K**0.5, group)
    bias = torch.randn(N, generator=g, device="cuda").to(dtype)
    residual = torch.randn(T, N, generator=g, device="cuda").to(dtype)
    return x, q, scale, bias, residual


def _ref_weight(q, scale, dtype, config):
    """What the variant multiplies by: (w, scale) for the reference to dequantize in fp32, or, for a tensor-core
    (USE_DOT) variant, the dequantized weight rounded to the activation dtype, as the kernel rounds it."""
    if config["USE_DOT"]:
        return dequantize(q, scale).to(dtype), None
    return q, scale


def _default(module, T, K, N, group, **attrs):
    """The config the launcher's heuristic gives these inputs (its meta, as linear() / rms_norm_linear() build it)."""
    meta = {"K": K, "N": N, "eps": EPS, "stride_x": K, "max_T": T, "max_S": 1, "T_bucket": T, "quant": "int4",
            "group_size": group, **attrs}
    return module.default(meta)


def _poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _close(out, ref, dtype):
    assert not out.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("T", DECODE + PREFILL)
def test_int4_linear_bias_residual(T, K, N, dtype, group):
    x, q, scale, bias, residual = _inputs(T, K, N, dtype, group, seed=T + K + N)
    config = _default(linear_op, T, K, N, group, has_bias=True, has_residual=True, act=None, stride_out=N)
    out = linear_op.linear(x, q, bias, residual, scale=scale, out=_poisoned(T, N, dtype=dtype), config=config)
    w, s = _ref_weight(q, scale, dtype, config)
    _close(out, linear_op.reference(x, w, bias, residual, scale=s), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("T", DECODE + PREFILL)
@pytest.mark.parametrize("act", [None, "silu_mul", "gelu_tanh_mul"])
def test_int4_rms_norm_linear(act, T, K, N, dtype):
    group = 32 if act else 128  # both group sizes, without doubling every JIT compile
    x, q, scale, bias, _ = _inputs(T, K, N, dtype, group, seed=3 * T + K + N)
    width = N // 2 if act else N
    config = _default(rnl_op, T, K, N, group, has_bias=True, act=act, stride_out=width)
    out = rnl_op.rms_norm_linear(x, q, bias, scale=scale, eps=EPS, act=act, out=_poisoned(T, width, dtype=dtype),
                                 config=config)
    w, s = _ref_weight(q, scale, dtype, config)
    _close(out, rnl_op.reference(x, w, bias, scale=s, eps=EPS, act=act), dtype)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
@pytest.mark.parametrize("T,bucket", [(1, 1), (3, 4), (16, 16), (64, 64), (300, 2048)])
def test_int4_every_candidate_config(op, T, bucket, group):
    # Every config the autotuner may pick for an int4 node, split-K included, K chunks shorter and longer than a
    # group, in bf16 at a Llama-1B qkv shape.
    K, N, dtype = 2048, 2560, torch.bfloat16
    x, q, scale, bias, residual = _inputs(T, K, N, dtype, group, seed=T)
    module = linear_op if op == "linear" else rnl_op
    meta = {"K": K, "N": N, "eps": EPS, "has_bias": True, "has_residual": op == "linear", "quant": "int4",
            "group_size": group, "max_T": max(T, bucket), "max_S": 32, "T_bucket": bucket}
    configs = module.configs(meta)
    assert configs and all(c["BLOCK_K"] >= 32 for c in configs)
    assert bucket > 4 or any(c["SPLIT_K"] > 1 for c in configs)
    for config in configs:
        w, s = _ref_weight(q, scale, dtype, config)
        if op == "linear":
            out = linear_op.linear(x, q, bias, residual, scale=scale, out=_poisoned(T, N, dtype=dtype), config=config)
            ref = linear_op.reference(x, w, bias, residual, scale=s)
        else:
            out = rnl_op.rms_norm_linear(x, q, bias, scale=scale, eps=EPS, out=_poisoned(T, N, dtype=dtype),
                                         config=config)
            ref = rnl_op.reference(x, w, bias, scale=s, eps=EPS)
        _close(out, ref, dtype)
