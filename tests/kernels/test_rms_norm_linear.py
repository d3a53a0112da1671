import pytest
import torch

from kernels import silu_mul
from kernels.matmul_configs import gemm, gemv
from kernels.rms_norm_linear import SPEC, configs, reference, rms_norm_linear
from tests.kernels.test_linear import assert_fits_shared_memory

# The layouts of tests/kernels/test_linear.py; split-K is where rstd needs care (partial sums of squares).
CONFIGS = {
    "gemv1": gemv(1, 16, 32, 1, False),
    "gemv4_split3": gemv(4, 32, 16, 3, False),
    "gemv_dot_split2": gemv(16, 32, 32, 2, True),
    "gemm": gemm(32, 16, 32, 4),
    "default": None,
}
SHAPES = [(1, 64, 48), (3, 100, 70), (37, 123, 130), (70, 96, 50)]
CASES = [(name, *shape) for name in CONFIGS for shape in SHAPES if name != "gemv1" or shape[0] <= 16]
EPS = 1e-5


def _inputs(T, K, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # An offset and a spread of row scales, so rstd differs per row and a wrong or missing rstd shows.
    x = (torch.randn(T, K, generator=g) * torch.rand(T, 1, generator=g) * 4 + 0.3).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    return x, w, bias


def _poisoned(T, N, dtype):
    return torch.full((T, N), float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 2e-3)])
@pytest.mark.parametrize("name,T,K,N", CASES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_rms_norm_linear_matches_reference(use_bias, name, T, K, N, dtype, atol, rtol):
    x, w, bias = _inputs(T, K, N, dtype, seed=T * 7 + K * 13 + N)
    bias = bias if use_bias else None
    out = rms_norm_linear(x, w, bias, eps=EPS, out=_poisoned(T, N, dtype), config=CONFIGS[name])
    torch.testing.assert_close(out, reference(x, w, bias, eps=EPS), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ["gemv1", "gemv4_split3"])
def test_rms_norm_linear_bf16_without_dot(name):
    # tl.dot on bf16 is wrong in the interpreter; the broadcast-product GEMV is not, so bf16 is checked here.
    x, w, bias = _inputs(6, 130, 40, torch.bfloat16, seed=3)
    out = rms_norm_linear(x, w, bias, eps=EPS, out=_poisoned(6, 40, torch.bfloat16), config=CONFIGS[name])
    torch.testing.assert_close(out, reference(x, w, bias, eps=EPS), atol=2e-2, rtol=2e-2)


def test_folded_weight_equals_norm_then_linear():
    # What the compiler relies on: rstd(x) * (x @ (W diag(g))^T) == (x * rstd(x) * g) @ W^T.
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(9, 88, generator=g) + 0.5, torch.randn(33, 88, generator=g) / 10
    gain = 1 + 0.3 * torch.randn(88, generator=g)
    unfused = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * gain) @ W.T
    torch.testing.assert_close(rms_norm_linear(x, W * gain, eps=EPS, config=CONFIGS["gemv4_split3"]), unfused,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_rows_give_bias(name):
    # Padding rows are zeros: rstd is 1/sqrt(eps), finite, times a zero product, so the row is exactly the bias.
    x, w, bias = _inputs(20, 72, 36, torch.float32, seed=4)
    x[[0, 7, 19]] = 0.0
    out = rms_norm_linear(x, w, bias, eps=EPS, out=_poisoned(20, 36, torch.float32), config=CONFIGS[name])
    torch.testing.assert_close(out[[0, 7, 19]], bias.expand(3, 36), atol=0, rtol=0)
    torch.testing.assert_close(out, reference(x, w, bias, eps=EPS), atol=1e-4, rtol=1e-4)


def test_rms_norm_linear_row_stride():
    x_wide, w, bias = _inputs(11, 160, 30, torch.float32, seed=6)
    x, w = x_wide[:, :100], w[:, :100].contiguous()
    for config in (CONFIGS["gemv4_split3"], CONFIGS["gemm"]):
        out = rms_norm_linear(x, w, bias, eps=EPS, out=_poisoned(11, 30, torch.float32), config=config)
        torch.testing.assert_close(out, reference(x, w, bias, eps=EPS), atol=1e-4, rtol=1e-4)


def test_split_k_plan_scratch():
    meta = {"K": 2048, "N": 2560, "eps": EPS, "has_bias": False, "max_T": 256, "max_S": 8, "T_bucket": 1}
    dtypes = {"x": "bf16", "w": "bf16", "out": "bf16"}
    plan = SPEC.plan(meta, dtypes, gemv(1, 32, 128, 2, False))
    assert [launch.name for launch in plan.launches] == ["_rms_norm_linear_kernel"]
    # Partials hold the bucket's rows (1), not max_T's.
    assert dict(plan.scratch) == {"partial": (2 * 1 * 2560, "fp32"), "sumsq": (2560 // 32 * 2 * 1, "fp32"),
                                  "semaphores": (2560 // 32, "i32")}


def _interleaved(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate; up] rows -> row 2j gate_j, row 2j + 1 up_j (the layout the SwiGLU epilogue reads)."""
    gate, up = gate_up.chunk(2, dim=0)
    return torch.stack([gate, up], dim=1).flatten(0, 1).contiguous()


def _swiglu_case(T, K, I, dtype, use_bias, config):
    x, w, bias = _inputs(T, K, 2 * I, dtype, seed=T * 5 + K * 3 + I)
    bias = bias if use_bias else None
    out = rms_norm_linear(x, _interleaved(w), None if bias is None else _interleaved(bias[:, None])[:, 0], eps=EPS,
                          act="silu_mul", out=_poisoned(T, I, dtype), config=config)
    # The unfused pair over the plain [gate; up] weight: rms_norm_linear -> [T, 2I] -> silu_mul -> [T, I].
    want = silu_mul.reference(reference(x.float(), w.float(), None if bias is None else bias.float(), eps=EPS))
    return out, want.to(dtype)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 2e-3)])
@pytest.mark.parametrize("name,T,K,N", CASES)
def test_swiglu_epilogue_matches_linear_then_silu_mul(name, T, K, N, dtype, atol, rtol):
    out, want = _swiglu_case(T, K, N // 2 + 1, dtype, T % 2 == 1, CONFIGS[name])
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 2e-3)])
@pytest.mark.parametrize("bucket", [1, 3, 16, 64, 256])
def test_swiglu_epilogue_every_candidate_config(bucket, dtype, atol, rtol):
    # K of 512 so the split-K candidates really split (the last split runs the epilogue); I of 37 leaves a
    # partial column tile in every layout.
    T, K, I = bucket if bucket < 64 else bucket - 5, 512, 37
    meta = {"K": K, "N": 2 * I, "eps": EPS, "has_bias": True, "act": "silu_mul", "max_T": T, "max_S": 1,
            "T_bucket": bucket}
    cands = configs(meta)
    assert bucket > 4 or any(c["SPLIT_K"] > 1 for c in cands)
    for config in cands:
        out, want = _swiglu_case(T, K, I, dtype, True, config)
        torch.testing.assert_close(out, want, atol=atol, rtol=rtol, msg=lambda m, c=config: f"{c}: {m}")


def test_swiglu_plan_writes_half_width():
    meta = {"K": 2048, "N": 2 * 5632, "eps": EPS, "has_bias": False, "act": "silu_mul", "max_T": 64, "max_S": 8,
            "T_bucket": 1}
    dtypes = {"x": "bf16", "w": "bf16", "out": "bf16"}
    (main,) = SPEC.plan(meta, dtypes, gemv(1, 32, 128, 2, False)).launches
    assert dict(main.constexprs)["ACT_SILU_MUL"] is True
    with pytest.raises(ValueError, match="act"):
        SPEC.plan({**meta, "act": "gelu"}, dtypes, gemv(1, 32, 128, 1, False))


COMPILE_CASES = [("fp16", b) for b in (1, 16, 64, 2048)] + [("bf16", 1), ("bf16", 2048), ("fp32", 2048)]


@pytest.mark.parametrize("dtype,bucket", COMPILE_CASES)
def test_rms_norm_linear_cross_compiles(dtype, bucket):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {"K": 2048, "N": 2560, "eps": 1e-5, "has_bias": True, "max_T": 2048, "max_S": 32, "T_bucket": bucket}
    dtypes = {"x": dtype, "w": dtype, "bias": dtype, "out": dtype}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3
    assert_fits_shared_memory(SPEC, meta, dtypes)


@pytest.mark.parametrize("dtype,bucket", [("fp32", 2048), ("fp16", 16), ("bf16", 1), ("bf16", 2048)])
def test_swiglu_epilogue_cross_compiles(dtype, bucket):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {"K": 2048, "N": 2 * 5632, "eps": 1e-5, "has_bias": False, "act": "silu_mul", "max_T": 2048, "max_S": 32,
            "T_bucket": bucket}
    dtypes = {"x": dtype, "w": dtype, "out": dtype}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3
