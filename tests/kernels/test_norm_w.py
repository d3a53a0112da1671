"""rms_norm_linear with the norm weight applied to x in the kernel (USE_NORM_W, input norm_w [K]), against the
maths written here in fp64: out = rstd(x) * ((x * g) @ W^T) (+ bias), rstd(x) = 1 / sqrt(mean(x^2) + eps) over the
raw x, then the epilogue's activation (SwiGLU / GeGLU, or the rope of tests/kernels/test_rope_epilogue.py).

That is what a quantized build runs (W keeps its own int8 / int4 grid, g is not folded in), so W is drawn here in
each storage: fp (no scheme), int8 q * scale per row, int4 q * scale + min per group. Since x * g @ W^T equals
x @ (W diag(g))^T, the expected values come from the tests' own matmul maths over W diag(g). g ~ 1 + N(0, 0.5), so a
kernel that skips it, or puts the raw x's sum of squares on x * g, fails. Fresh random inputs, outputs NaN-poisoned.
"""

import pytest
import torch

from kernels import rms_norm_linear
from kernels.matmul_configs import gemm, gemv
from kernels.rope_epilogue import RopeEpilogue
from tests.kernels.test_int4_matmul import _int4_weight
from tests.kernels.test_int4_matmul import _maths as _matmul_maths
from tests.kernels.test_rope_epilogue import _heads
from tests.kernels.test_rope_epilogue import _inputs as _rope_inputs
from tests.kernels.test_rope_epilogue import _maths as _rope_maths

CONFIGS = {
    "gemv1": gemv(1, 16, 32, 1, False),
    "gemv4_split3": gemv(4, 32, 64, 3, False),
    "gemv_dot_split2": gemv(16, 32, 32, 2, True),
    "gemm": gemm(32, 16, 32, 4),
    "default": None,
}
EPS = 1e-5
GROUP = 32


def _weight(scheme: str, N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(w as the kernel reads it, its scale or None, W [N, K] fp64 as the maths uses it)."""
    g = torch.Generator().manual_seed(seed)
    if scheme == "int4":
        return _int4_weight(N, K, GROUP, seed)
    if scheme == "int8":
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        scale = torch.exp(torch.randn(N, generator=g)) / (127 * K**0.5)
        return q, scale, q.double() * scale.double()[:, None]
    w = torch.randn(N, K, generator=g) / K**0.5
    return w, None, w.double()


def _inputs(T, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, K, generator=g) * torch.rand(T, 1, generator=g) * 3 + 0.2).to(dtype)
    norm_w = 1 + 0.5 * torch.randn(K, generator=g)
    return x, norm_w


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# (T, K, N): K a multiple of the int4 group, N not a power of two; one row per step is the layout for T <= 4.
SHAPES = [(1, 64, 48), (3, 96, 70), (19, 160, 34)]
CASES = [(name, *shape) for name in CONFIGS for shape in SHAPES if name != "gemv1" or shape[0] <= 4]


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
@pytest.mark.parametrize("name,T,K,N", CASES)
@pytest.mark.parametrize("act", [None, "silu_mul", "gelu_tanh_mul"])
def test_norm_w_applied_to_x(name, T, K, N, scheme, act):
    x, norm_w = _inputs(T, K, torch.float32, seed=T * 3 + K + N)
    w, scale, wd = _weight(scheme, N, K, seed=N + K)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(T))
    width = N // 2 if act else N
    out = rms_norm_linear.rms_norm_linear(x, w, bias, scale=scale, norm_w=norm_w, eps=EPS, act=act,
                                          out=_nan(T, width, dtype=torch.float32), config=CONFIGS[name])
    want = _matmul_maths(x, wd * norm_w.double()[None, :], bias, use_rms=True, act=act)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    # The reference the torch backend runs computes the same thing.
    ref = rms_norm_linear.reference(x, w, bias, scale=scale, norm_w=norm_w, eps=EPS, act=act)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemv1", "gemv_dot_split2", "gemm"])
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float16])
def test_norm_w_fp16(name, norm_dtype):
    # fp16 activations; the norm weight fp32 (Gemma's 1 + w, kept fp32) or in the model dtype.
    T = 1 if name == "gemv1" else 20
    x, norm_w = _inputs(T, 128, torch.float16, seed=7)
    w, scale, wd = _weight("int4", 48, 128, seed=8)
    out = rms_norm_linear.rms_norm_linear(x, w, None, scale=scale, norm_w=norm_w.to(norm_dtype), eps=EPS,
                                          act="silu_mul", out=_nan(T, 24, dtype=torch.float16), config=CONFIGS[name])
    want = _matmul_maths(x, wd * norm_w.to(norm_dtype).double()[None, :], use_rms=True, act="silu_mul")
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["gemv1", "gemv4_split3", "gemv_dot_split2", "gemm"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_norm_w_with_rope_epilogue(name, scheme):
    # The qkv matmul of a quantized build: norm weight on x, rows paired for rotation, KV-cache write.
    T = 1 if name == "gemv1" else 5
    heads = _heads(4, 2, 16, 16, True, True)
    x, w0, bias, positions, cos_sin, slots, k_cache, v_cache = _rope_inputs(T, heads, torch.float32, True, seed=T,
                                                                            k=64)
    _, norm_w = _inputs(T, 64, torch.float32, seed=T + 1)
    w, scale, wd = _weight(scheme, w0.shape[0], 64, seed=T + 2)
    want, k_want, v_want = _rope_maths(x, wd * norm_w.double()[None, :], bias, positions, cos_sin, slots, k_cache,
                                       v_cache, use_rms=True, **heads)
    order = RopeEpilogue.from_attrs(heads).row_order()
    out = _nan(T, w.shape[0], dtype=torch.float32)
    rms_norm_linear.rms_norm_linear(x, w[order].contiguous(), bias[order], positions, cos_sin, slots, k_cache,
                                    v_cache, scale=scale[order].contiguous(), norm_w=norm_w, eps=EPS, act="rope",
                                    **heads, out=out, config=CONFIGS[name])
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_cache.double(), k_want.double(), atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(v_cache.double(), v_want.double(), atol=1e-4, rtol=1e-4, equal_nan=True)


def test_norm_w_off_binds_no_norm_weight():
    # Without the attr the launch is the folded kernel as before: USE_NORM_W off, norm_w_ptr bound to w (unread).
    meta = {"K": 128, "N": 32, "eps": EPS, "has_bias": False, "max_T": 4, "max_S": 1, "T_bucket": 1}
    dtypes = {"x": "fp16", "w": "fp16", "out": "fp16"}
    launch = rms_norm_linear.plan(meta, dtypes, rms_norm_linear.default(meta)).launches[0]
    assert dict(launch.constexprs)["USE_NORM_W"] is False and dict(launch.args)["norm_w_ptr"] == ("tensor", "w")
    launch = rms_norm_linear.plan({**meta, "use_norm_w": True}, {**dtypes, "norm_w": "fp32"},
                                  rms_norm_linear.default(meta)).launches[0]
    assert dict(launch.constexprs)["USE_NORM_W"] is True and dict(launch.args)["norm_w_ptr"] == ("tensor", "norm_w")
    assert dict(launch.signature)["norm_w_ptr"] == "*fp32"


@pytest.mark.parametrize("scheme,bucket", [("int8", 1), ("int4", 16), ("int4", 2048)])
def test_norm_w_cross_compiles(scheme, bucket):
    from tests.kernels.aot_util import assert_cross_compiles
    from tests.kernels.test_linear import assert_fits_shared_memory

    meta = {"K": 2048, "N": 5632, "has_bias": False, "eps": EPS, "quant": scheme, "use_norm_w": True, "act": "silu_mul",
            "max_T": 2048, "max_S": 32, "T_bucket": bucket, **({"group_size": 128} if scheme == "int4" else {})}
    dtypes = {"x": "bf16", "w": {"int8": "i8", "int4": "u8"}[scheme], "scale": "fp32", "norm_w": "bf16", "out": "bf16"}
    assert assert_cross_compiles(rms_norm_linear.SPEC, meta, dtypes) >= 3
    assert_fits_shared_memory(rms_norm_linear.SPEC, meta, dtypes)


def test_launch_of_an_index_written_before_norm_w():
    # An index from before USE_NORM_W lists neither it nor norm_w_ptr; launches bind parameters by name, so the
    # kernel's defaults (off, no pointer) must keep such an artifact's folded rms_norm_linear running.
    import dataclasses

    from kernels.spec import run

    x, norm_w = _inputs(3, 64, torch.float32, seed=21)
    w, scale, wd = _weight("int8", 40, 64, seed=22)
    out = _nan(3, 40, dtype=torch.float32)
    meta = {"K": 64, "N": 40, "eps": EPS, "has_bias": False, "quant": "int8", "max_T": 3, "max_S": 1, "T_bucket": 3}
    plan = rms_norm_linear.plan(meta, {"x": "fp32", "w": "i8", "scale": "fp32", "out": "fp32"}, CONFIGS["gemv4_split3"])
    old = tuple(dataclasses.replace(launch, constexprs=tuple(c for c in launch.constexprs if c[0] != "USE_NORM_W"),
                                    args=tuple(a for a in launch.args if a[0] != "norm_w_ptr"),
                                    signature=tuple(p for p in launch.signature if p[0] not in ("USE_NORM_W",
                                                                                                "norm_w_ptr")))
                for launch in plan.launches)
    run(dataclasses.replace(plan, launches=old), {"x": x, "w": w, "scale": scale, "out": out}, {"T": 3, "S": 1})
    torch.testing.assert_close(out.double(), _matmul_maths(x, wd, use_rms=True), atol=1e-4, rtol=1e-4)
