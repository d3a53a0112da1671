"""The kernel variants Gemma 2/3 add: the GeGLU epilogue of rms_norm_linear, rms_norm with a residual-add epilogue
(the sandwich norms) and the scaled embedding, each against the maths written here; outputs NaN-poisoned first."""

import math

import pytest
import torch

from kernels import embedding, gelu_tanh_mul, rms_norm, rms_norm_linear
from kernels.matmul_configs import gemm, gemv
from tests.kernels.test_rms_norm_linear import _interleaved

EPS = 1e-6
CONFIGS = {"gemv1": gemv(1, 16, 32, 1, False), "gemv4_split3": gemv(4, 32, 16, 3, False),
           "gemv_dot_split2": gemv(16, 32, 32, 2, True), "gemm": gemm(32, 16, 32, 4), "default": None}


def _gelu_tanh(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 2e-3)])
@pytest.mark.parametrize("name,T,K,I", [("gemv1", 1, 64, 24), ("gemv4_split3", 3, 100, 35),
                                        ("gemv_dot_split2", 16, 96, 37), ("gemm", 37, 123, 65),
                                        ("default", 70, 96, 25)])
def test_geglu_epilogue(name, T, K, I, dtype, atol, rtol):
    g = torch.Generator().manual_seed(T + K + I)
    x = (torch.randn(T, K, generator=g) * torch.rand(T, 1, generator=g) * 4 + 0.3).to(dtype)
    w = (torch.randn(2 * I, K, generator=g) / K**0.5 * 2).to(dtype)  # gates of a few units: tanh's curve matters
    out = torch.full((T, I), float("nan"), dtype=dtype)
    rms_norm_linear.rms_norm_linear(x, _interleaved(w), eps=EPS, act="gelu_tanh_mul", out=out, config=CONFIGS[name])
    xf = x.double()
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) @ w.double().T
    want = _gelu_tanh(h[:, :I]) * h[:, I:]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    ref = rms_norm_linear.reference(x, _interleaved(w), eps=EPS, act="gelu_tanh_mul")
    torch.testing.assert_close(ref.double(), want, atol=atol, rtol=rtol)
    # The same numbers as the unfused pair: [gate | up] from the plain weight, then the GeGLU kernel's reference.
    unfused = gelu_tanh_mul.reference(rms_norm_linear.reference(x.float(), w.float(), eps=EPS))
    torch.testing.assert_close(out.float(), unfused, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("T,D", [(1, 64), (5, 123), (37, 576)])
def test_rms_norm_residual_epilogue(T, D, dtype, tol):
    g = torch.Generator().manual_seed(T * D)
    x = (torch.randn(T, D, generator=g) * 5).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).float()  # Gemma's 1 + w stays fp32
    residual = torch.randn(T, D, generator=g).to(dtype)
    xf = x.double()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.double()).to(dtype)
    want = normed.double() + residual.double()
    out = torch.full((T, D), float("nan"), dtype=dtype)
    rms_norm.rms_norm(x, w, EPS, residual=residual, out=out)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(rms_norm.reference(x, w, EPS, residual=residual).double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_embedding(dtype):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(50, 72, generator=g).to(dtype)
    ids = torch.tensor([0, 49, 7, 7, 13], dtype=torch.int32)
    scale = float(torch.tensor(math.sqrt(3072)).to(dtype))  # 55.5 in bf16, as HF rounds it
    out = torch.full((5, 72), float("nan"), dtype=dtype)
    embedding.embedding(ids, weight, out=out, scale=scale)
    # HF: embedding rows times the normalizer in the model dtype, one rounding.
    want = weight[ids.long()] * torch.tensor(scale, dtype=dtype)
    assert torch.equal(embedding.reference(ids, weight, scale=scale), want)
    if dtype == torch.bfloat16:
        # The interpreter casts fp32 to bf16 by truncation, not rounding: one bf16 step off at most (GPUs round).
        torch.testing.assert_close(out, want, atol=0, rtol=2**-7)
    else:
        assert torch.equal(out, want)


def test_plain_variants_keep_their_kernels():
    # Without the new attrs every other family plans exactly what it did: flags off.
    meta = {"D": 64, "V": 100, "eps": EPS, "max_T": 8, "max_S": 1}
    dt = {"x": "fp16", "w": "fp16", "out": "fp16", "ids": "i32", "weight": "fp16"}
    assert dict(rms_norm.plan(meta, dt, rms_norm.default(meta)).launches[0].constexprs)["HAS_RESIDUAL"] is False
    plain = embedding.plan(meta, dt, embedding.default(meta))
    assert plain == embedding.plan({**meta, "scale": 1.0}, dt, embedding.default(meta))
    assert dict(plain.launches[0].constexprs)["USE_SCALE"] is False


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gemma_variants_cross_compile(dtype):
    from compiler.aot import compile_launch
    from tests.kernels.aot_util import TARGETS, assert_cross_compiles

    # The GeGLU epilogue in each layout (broadcast GEMV, tl.dot GEMV, GEMM tiles) at its default config: the
    # epilogue is the only new code, and every candidate of every bucket would take a minute and a half.
    rnl = {"K": 2304, "N": 2 * 9216, "eps": EPS, "has_bias": False, "act": "gelu_tanh_mul", "max_T": 256,
           "max_S": 8}
    for bucket in (1, 16, 256):
        meta = {**rnl, "T_bucket": bucket}
        # The last launch is the matmul (at 256 rows a pre-pass for the sums of squares comes first).
        launch = rms_norm_linear.plan(meta, {"x": dtype, "w": dtype, "out": dtype},
                                      rms_norm_linear.default(meta)).launches[-1]
        assert dict(launch.constexprs)["ACT_SILU_MUL"] == 2
        for target in TARGETS:
            assert len(compile_launch(launch, target)[0]) > 1000, (bucket, target)
    norm = {"D": 2304, "eps": EPS, "has_residual": True, "max_T": 256, "max_S": 8}
    assert assert_cross_compiles(rms_norm.SPEC, norm, {"x": dtype, "w": "fp32", "residual": dtype, "out": dtype}) >= 3
    emb = {"V": 256000, "D": 2304, "scale": 48.0, "max_T": 256, "max_S": 8}
    assert assert_cross_compiles(embedding.SPEC, emb, {"ids": "i32", "weight": dtype, "out": dtype}) >= 3
