"""Weight-only int8 linear / rms_norm_linear against the maths written here, in fp64: W = q * scale[:, None] (q int8,
one fp32 scale per output row), y = x @ W^T (times the RMSNorm's rstd), + bias, + residual, then the epilogue's
activation (SwiGLU / GeGLU over interleaved gate/up rows, or the rope of tests/kernels/test_rope_epilogue.py).

Every layout is run, split-K on and off: the scale must be applied once, by whichever program runs the epilogue.
Outputs are NaN-poisoned before the run, inputs fresh random per case.
"""

import pytest
import torch

from kernels import linear, rms_norm_linear
from kernels.matmul_configs import gemm, gemv
from kernels.rope_epilogue import RopeEpilogue
from tests.kernels.test_linear import assert_fits_shared_memory
from tests.kernels.test_rope_epilogue import _heads
from tests.kernels.test_rope_epilogue import _inputs as _rope_inputs
from tests.kernels.test_rope_epilogue import _maths as _rope_maths

CONFIGS = {
    "gemv1": gemv(1, 16, 32, 1, False),
    "gemv4_split3": gemv(4, 32, 16, 3, False),
    "gemv_dot": gemv(16, 32, 32, 1, True),
    "gemv_dot_split2": gemv(16, 32, 32, 2, True),
    "gemm": gemm(32, 16, 32, 4),
    "default": None,
}
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 3e-3, 3e-3)]
EPS = 1e-5


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8, from the definition: scale = max|w| / 127, q = round(w / scale) in [-127, 127]."""
    scale = w.float().abs().amax(dim=1) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _maths(x, q, scale, bias=None, residual=None, *, use_rms=False, act=None):
    xd = x.double()
    y = xd @ (q.double() * scale.double()[:, None]).T
    if use_rms:
        y = y * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS)
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    if act == "silu_mul":
        y = torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2]
    elif act == "gelu_tanh_mul":
        y = torch.nn.functional.gelu(y[:, 0::2], approximate="tanh") * y[:, 1::2]
    return y


def _inputs(T, K, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, K, generator=g) * torch.rand(T, 1, generator=g) * 3 + 0.2).to(dtype)
    # Rows of very different magnitudes, so a scale applied to the wrong column shows.
    w = torch.randn(N, K, generator=g) * torch.exp(torch.randn(N, 1, generator=g)) / K**0.5
    q, scale = _quantize(w)
    bias = torch.randn(N, generator=g).to(dtype)
    residual = torch.randn(T, N, generator=g).to(dtype)
    return x, q, scale, bias, residual


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# One row per step is the layout for T <= 4; many-row shapes only make that test slow in the interpreter.
SHAPES = [(1, 64, 48), (3, 100, 70), (37, 123, 130)]
CASES = [(name, *shape) for name in CONFIGS for shape in SHAPES if name != "gemv1" or shape[0] <= 4]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("name,T,K,N", CASES)
@pytest.mark.parametrize("use_bias,use_residual", [(False, False), (True, True)])
def test_int8_linear(name, T, K, N, use_bias, use_residual, dtype, atol, rtol):
    x, q, scale, bias, residual = _inputs(T, K, N, dtype, seed=T * 7 + K * 13 + N)
    bias, residual = (bias if use_bias else None), (residual if use_residual else None)
    out = linear.linear(x, q, bias, residual, scale=scale, out=_nan(T, N, dtype=dtype), config=CONFIGS[name])
    torch.testing.assert_close(out.double(), _maths(x, q, scale, bias, residual), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ["gemv4_split3", "gemm"])
def test_int8_linear_residual_in_place(name):
    x, q, scale, bias, residual = _inputs(21, 90, 66, torch.float16, seed=11)
    want = _maths(x, q, scale, bias, residual)
    out = linear.linear(x, q, bias, residual, scale=scale, out=residual, config=CONFIGS[name])
    assert out is residual
    torch.testing.assert_close(residual.double(), want, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("name,T,K,N", CASES)
@pytest.mark.parametrize("act", [None, "silu_mul", "gelu_tanh_mul"])
def test_int8_rms_norm_linear(name, T, K, N, act, dtype, atol, rtol):
    x, q, scale, bias, _ = _inputs(T, K, N, dtype, seed=T * 5 + K * 3 + N)
    width = N // 2 if act else N
    out = rms_norm_linear.rms_norm_linear(x, q, bias, scale=scale, eps=EPS, act=act, out=_nan(T, width, dtype=dtype),
                                          config=CONFIGS[name])
    torch.testing.assert_close(out.double(), _maths(x, q, scale, bias, use_rms=True, act=act), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ["gemv1", "gemv4_split3"])
@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
def test_int8_bf16_without_dot(op, name):
    # tl.dot on bf16 is wrong in the interpreter; the broadcast-product GEMV is not, so bf16 is checked here.
    x, q, scale, bias, residual = _inputs(4, 130, 40, torch.bfloat16, seed=3)
    if op == "linear":
        out = linear.linear(x, q, bias, residual, scale=scale, out=_nan(4, 40, dtype=torch.bfloat16),
                            config=CONFIGS[name])
        want = _maths(x, q, scale, bias, residual)
    else:
        out = rms_norm_linear.rms_norm_linear(x, q, bias, scale=scale, eps=EPS, act="silu_mul",
                                              out=_nan(4, 20, dtype=torch.bfloat16), config=CONFIGS[name])
        want = _maths(x, q, scale, bias, use_rms=True, act="silu_mul")
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


# (op, T, Hq, Hk, Dh, Dr, is_neox, write_cache): decode with the cache write, partial neox rotary over many rows.
ROPE_CASES = [("rms_norm_linear", 1, 4, 2, 16, 16, True, True), ("linear", 5, 3, 1, 12, 6, True, True),
              ("rms_norm_linear", 19, 2, 2, 20, 8, False, False)]


@pytest.mark.parametrize("name", ["gemv1", "gemv4_split3", "gemv_dot_split2", "gemm"])
@pytest.mark.parametrize("op,T,Hq,Hk,Dh,Dr,is_neox,write_cache", ROPE_CASES)
def test_int8_rope_epilogue(name, op, T, Hq, Hk, Dh, Dr, is_neox, write_cache):
    if name == "gemv1" and T > 4:
        pytest.skip("one row per step is the layout for T <= 4")
    heads = _heads(Hq, Hk, Dh, Dr, is_neox, write_cache)
    x, w, bias, positions, cos_sin, slots, k_cache, v_cache = _rope_inputs(T, heads, torch.float32, True, seed=T + Dh)
    q, scale = _quantize(w)
    want, k_want, v_want = _rope_maths(x, q.double() * scale.double()[:, None], bias, positions, cos_sin, slots,
                                       k_cache, v_cache, use_rms=op == "rms_norm_linear", **heads)
    # The kernel reads the rows paired for rotation (what the compiler stores): quantized rows permuted with them.
    order = RopeEpilogue.from_attrs(heads).row_order()
    kw = {"eps": EPS} if op == "rms_norm_linear" else {}
    lead = (x, q[order].contiguous(), bias[order]) + (() if op == "rms_norm_linear" else (None,))
    out = _nan(T, q.shape[0], dtype=torch.float32)
    getattr(globals()[op], op)(*lead, positions, cos_sin, slots, k_cache, v_cache, scale=scale[order].contiguous(),
                               act="rope", **heads, **kw, out=out, config=CONFIGS[name])
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_cache.double(), k_want.double(), atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(v_cache.double(), v_want.double(), atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
def test_int8_references_dequantize(op):
    # The torch backend runs int8 nodes through these references: they must be W = q * scale, nothing else.
    x, q, scale, bias, _ = _inputs(6, 50, 24, torch.float32, seed=2)
    kw = {"eps": EPS} if op == "rms_norm_linear" else {}
    got = globals()[op].reference(x, q, bias, scale=scale, **kw)
    torch.testing.assert_close(got.double(), _maths(x, q, scale, bias, use_rms=op == "rms_norm_linear"), atol=1e-5,
                               rtol=1e-5)


def test_plan_checks_the_weight_scheme():
    meta = {"K": 64, "N": 32, "has_bias": False, "has_residual": False, "max_T": 4, "max_S": 1, "T_bucket": 1}
    config = linear.default(meta)
    with pytest.raises(ValueError, match="int8"):  # an int8 node whose w is not int8
        linear.plan({**meta, "quant": "int8"}, {"x": "fp16", "w": "fp16", "scale": "fp32", "out": "fp16"}, config)
    with pytest.raises(ValueError, match="int8"):  # an int8 w on a node without the scheme
        linear.plan(meta, {"x": "fp16", "w": "i8", "out": "fp16"}, config)
    with pytest.raises(ValueError, match="int4"):
        linear.plan({**meta, "quant": "int4"}, {"x": "fp16", "w": "i8", "scale": "fp32", "out": "fp16"}, config)
    plan = linear.plan({**meta, "quant": "int8"}, {"x": "fp16", "w": "i8", "scale": "fp32", "out": "fp16"}, config)
    launch = plan.launches[0]
    assert dict(launch.constexprs)["W_INT8"] is True
    assert dict(launch.signature)["w_ptr"] == "*i8" and dict(launch.args)["scale_ptr"] == ("tensor", "scale")


@pytest.mark.parametrize("bucket", [1, 16, 64, 2048])
def test_int8_candidates_load_16_bytes(bucket):
    meta = {"K": 2048, "N": 5632, "eps": EPS, "has_bias": False, "act": "silu_mul", "quant": "int8", "max_T": 2048,
            "max_S": 32, "T_bucket": bucket}
    for config in [*rms_norm_linear.configs(meta), rms_norm_linear.default(meta)]:
        assert config["BLOCK_K"] >= 16, config


@pytest.mark.parametrize("op,bucket", [("linear", 1), ("rms_norm_linear", 16), ("linear", 2048)])
def test_int8_cross_compiles(op, bucket):
    from tests.kernels.aot_util import assert_cross_compiles

    module = globals()[op]
    meta = {"K": 2048, "N": 5632, "has_bias": True, "has_residual": op == "linear", "eps": EPS, "quant": "int8",
            "max_T": 2048, "max_S": 32, "T_bucket": bucket}
    dtypes = {"x": "bf16", "w": "i8", "scale": "fp32", "bias": "bf16", "out": "bf16",
              **({"residual": "bf16"} if op == "linear" else {})}
    assert assert_cross_compiles(module.SPEC, meta, dtypes) >= 3
    assert_fits_shared_memory(module.SPEC, meta, dtypes)


@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
def test_int8_launch_of_an_index_written_before_int4(op):
    # A format 3 index written before int4 lists no W_INT4 / GROUP_SIZE constexprs; the interpret backend passes the
    # index's constexprs as they are, so the kernels' defaults for the two must keep such an artifact running.
    import dataclasses

    from kernels.spec import dtype_name, run

    module = globals()[op]
    x, q, scale, bias, residual = _inputs(3, 64, 40, torch.float32, seed=9)
    out = _nan(3, 40, dtype=torch.float32)
    meta = {"K": 64, "N": 40, "eps": EPS, "has_bias": True, "has_residual": op == "linear", "quant": "int8",
            "max_T": 3, "max_S": 1, "T_bucket": 3}
    tensors = {"x": x, "w": q, "scale": scale, "bias": bias, "out": out, **({"residual": residual} if op == "linear"
                                                                           else {})}
    plan = module.plan(meta, {r: dtype_name(t) for r, t in tensors.items()}, CONFIGS["gemv4_split3"])
    old = tuple(dataclasses.replace(launch, constexprs=tuple((k, v) for k, v in launch.constexprs
                                                             if k not in ("W_INT4", "GROUP_SIZE")))
                for launch in plan.launches)
    run(dataclasses.replace(plan, launches=old), tensors, {"T": 3, "S": 1})
    want = _maths(x, q, scale, bias, residual if op == "linear" else None, use_rms=op == "rms_norm_linear")
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
