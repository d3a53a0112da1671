"""Weight-only int4 linear / rms_norm_linear against the maths written here, in fp64: per row n and group g of G
consecutive k, W[n, k] = q[n, k] * scale[n, g] + min[n, g] with q in [0, 15] stored two per byte (k = 2j in the low
nibble of byte j, k = 2j + 1 in the high one), y = x @ W^T (times the RMSNorm's rstd), + bias, + residual, then
the epilogue's activation (SwiGLU / GeGLU over interleaved gate/up rows, or the rope).

The q, scales and mins are drawn here at random (not made by the compiler's quantizer) and packed here, so the kernels
are checked against the definition alone. Every layout runs, split-K on and off, with K chunks shorter than, equal
to and longer than a group (one (scale, min) per row, or one per group of the chunk); group sizes 32 and 128.
Outputs are NaN-poisoned before the run.
"""

import pytest
import torch

from kernels import linear, rms_norm_linear
from kernels.matmul_configs import gemm, gemv
from kernels.rope_epilogue import RopeEpilogue
from tests.kernels.test_rope_epilogue import _heads
from tests.kernels.test_rope_epilogue import _inputs as _rope_inputs
from tests.kernels.test_rope_epilogue import _maths as _rope_maths

CONFIGS = {
    "gemv1": gemv(1, 16, 32, 1, False),
    "gemv4_long_split3": gemv(4, 32, 256, 3, False),
    "gemv2_k64": gemv(2, 8, 64, 1, False),
    "gemv_dot_split2": gemv(16, 32, 64, 2, True),
    "gemm": gemm(32, 16, 32, 4),
    "gemm_k128": gemm(16, 32, 128, 4),
    "default": None,
}
# fp16: the tl.dot layouts round each dequantized weight to fp16 before the product (unlike int8's q, which fp16
# holds exactly), ~5e-4 relative per element; a nibble or a (scale, min) of the wrong group is off by far more.
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2)]
EPS = 1e-5


def _int4_weight(N: int, K: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed [N, K / 2] uint8, scale [N, K / G, 2] fp32 (scale, min), W [N, K] fp64 = q * scale + min)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int64)
    # Rows and groups of very different scales, and mins of both signs, so a pair read for the wrong group shows.
    scale = torch.exp(torch.randn(N, K // group, generator=g)) / (4 * K**0.5)
    low = -7.5 * scale * (1 + 0.5 * torch.randn(N, K // group, generator=g))
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    w = q.double() * scale.double().repeat_interleave(group, 1) + low.double().repeat_interleave(group, 1)
    return packed, torch.stack([scale, low], dim=2).contiguous(), w


def _maths(x, w, bias=None, residual=None, *, use_rms=False, act=None):
    xd = x.double()
    y = xd @ w.T
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


def _inputs(T, K, N, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, K, generator=g) * torch.rand(T, 1, generator=g) * 3 + 0.2).to(dtype)
    packed, scale, w = _int4_weight(N, K, group, seed + 1)
    bias = torch.randn(N, generator=g).to(dtype)
    residual = torch.randn(T, N, generator=g).to(dtype)
    return x, packed, scale, w, bias, residual


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# (T, K, N, G): K a multiple of G, N odd / not a power of two; one row per step is the layout for T <= 4.
SHAPES = [(1, 64, 48, 32), (3, 256, 70, 128), (19, 160, 34, 32)]
CASES = [(name, *shape) for name in CONFIGS for shape in SHAPES if name != "gemv1" or shape[0] <= 4]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("name,T,K,N,G", CASES)
def test_int4_linear_bias_residual(name, T, K, N, G, dtype, atol, rtol):
    x, packed, scale, w, bias, residual = _inputs(T, K, N, G, dtype, seed=T * 7 + K * 13 + N)
    out = linear.linear(x, packed, bias, residual, scale=scale, out=_nan(T, N, dtype=dtype), config=CONFIGS[name])
    torch.testing.assert_close(out.double(), _maths(x, w, bias, residual), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ["gemv1", "gemv4_long_split3", "gemm"])
def test_int4_linear_plain(name):
    x, packed, scale, w, *_ = _inputs(2, 128, 40, 128, torch.float32, seed=5)
    out = linear.linear(x, packed, scale=scale, out=_nan(2, 40, dtype=torch.float32), config=CONFIGS[name])
    torch.testing.assert_close(out.double(), _maths(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gemv4_long_split3", "gemm"])
def test_int4_linear_residual_in_place(name):
    x, packed, scale, w, bias, residual = _inputs(21, 96, 66, 32, torch.float16, seed=11)
    want = _maths(x, w, bias, residual)
    out = linear.linear(x, packed, bias, residual, scale=scale, out=residual, config=CONFIGS[name])
    assert out is residual
    torch.testing.assert_close(residual.double(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name,T,K,N,G", CASES)
@pytest.mark.parametrize("act", [None, "silu_mul", "gelu_tanh_mul"])
def test_int4_rms_norm_linear(name, T, K, N, G, act):
    x, packed, scale, w, bias, _ = _inputs(T, K, N, G, torch.float32, seed=T * 5 + K * 3 + N)
    width = N // 2 if act else N
    out = rms_norm_linear.rms_norm_linear(x, packed, bias, scale=scale, eps=EPS, act=act,
                                          out=_nan(T, width, dtype=torch.float32), config=CONFIGS[name])
    torch.testing.assert_close(out.double(), _maths(x, w, bias, use_rms=True, act=act), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gemv1", "gemv_dot_split2", "gemm_k128"])
def test_int4_rms_norm_linear_fp16(name):
    T = 1 if name == "gemv1" else 20
    x, packed, scale, w, bias, _ = _inputs(T, 256, 48, 128, torch.float16, seed=17)
    out = rms_norm_linear.rms_norm_linear(x, packed, None, scale=scale, eps=EPS, act="silu_mul",
                                          out=_nan(T, 24, dtype=torch.float16), config=CONFIGS[name])
    torch.testing.assert_close(out.double(), _maths(x, w, use_rms=True, act="silu_mul"), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["gemv1", "gemv4_long_split3"])
@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
def test_int4_bf16_without_dot(op, name):
    # tl.dot on bf16 is wrong in the interpreter; the broadcast-product GEMV is not, so bf16 is checked here.
    x, packed, scale, w, bias, residual = _inputs(4, 128, 40, 32, torch.bfloat16, seed=3)
    if op == "linear":
        out = linear.linear(x, packed, bias, residual, scale=scale, out=_nan(4, 40, dtype=torch.bfloat16),
                            config=CONFIGS[name])
        want = _maths(x, w, bias, residual)
    else:
        out = rms_norm_linear.rms_norm_linear(x, packed, bias, scale=scale, eps=EPS, act="silu_mul",
                                              out=_nan(4, 20, dtype=torch.bfloat16), config=CONFIGS[name])
        want = _maths(x, w, bias, use_rms=True, act="silu_mul")
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


# (op, T, Hq, Hk, Dh, Dr, is_neox, write_cache): decode with the cache write, partial neox rotary over many rows.
ROPE_CASES = [("rms_norm_linear", 1, 4, 2, 16, 16, True, True), ("linear", 5, 3, 1, 12, 6, True, True),
              ("rms_norm_linear", 19, 2, 2, 20, 8, False, False)]


@pytest.mark.parametrize("name", ["gemv1", "gemv4_long_split3", "gemv_dot_split2", "gemm"])
@pytest.mark.parametrize("op,T,Hq,Hk,Dh,Dr,is_neox,write_cache", ROPE_CASES)
def test_int4_rope_epilogue(name, op, T, Hq, Hk, Dh, Dr, is_neox, write_cache):
    if name == "gemv1" and T > 4:
        pytest.skip("one row per step is the layout for T <= 4")
    heads = _heads(Hq, Hk, Dh, Dr, is_neox, write_cache)
    x, w0, bias, positions, cos_sin, slots, k_cache, v_cache = _rope_inputs(T, heads, torch.float32, True, seed=T + Dh,
                                                                            k=64)
    packed, scale, w = _int4_weight(w0.shape[0], 64, 32, seed=T)
    want, k_want, v_want = _rope_maths(x, w, bias, positions, cos_sin, slots, k_cache, v_cache,
                                       use_rms=op == "rms_norm_linear", **heads)
    # The kernel reads the rows paired for rotation (what the compiler stores): packed rows and groups permuted.
    order = RopeEpilogue.from_attrs(heads).row_order()
    kw = {"eps": EPS} if op == "rms_norm_linear" else {}
    lead = (x, packed[order].contiguous(), bias[order]) + (() if op == "rms_norm_linear" else (None,))
    out = _nan(T, w.shape[0], dtype=torch.float32)
    getattr(globals()[op], op)(*lead, positions, cos_sin, slots, k_cache, v_cache, scale=scale[order].contiguous(),
                               act="rope", **heads, **kw, out=out, config=CONFIGS[name])
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_cache.double(), k_want.double(), atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(v_cache.double(), v_want.double(), atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
def test_int4_references_dequantize(op):
    # The torch backend runs int4 nodes through these references: they must be W = q * scale + min, nothing else.
    x, packed, scale, w, bias, _ = _inputs(6, 64, 24, 32, torch.float32, seed=2)
    kw = {"eps": EPS} if op == "rms_norm_linear" else {}
    got = globals()[op].reference(x, packed, bias, scale=scale, **kw)
    torch.testing.assert_close(got.double(), _maths(x, w, bias, use_rms=op == "rms_norm_linear"), atol=1e-5,
                               rtol=1e-5)


def test_quantize_int4_rounds_to_nearest_within_each_group():
    # The compiler's quantizer against the definition: scale = (max - min) / 15 and min per group, q the nearest step.
    from kernels.weight_quant import quantize_int4

    w = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
    packed, pairs = quantize_int4(w, 32)
    q = torch.stack([packed & 15, packed >> 4], dim=2).reshape(5, 96).double()
    wg = w.double().reshape(5, 3, 32)
    lo, hi = wg.amin(2), wg.amax(2)
    torch.testing.assert_close(pairs[..., 0].double(), (hi - lo) / 15, atol=0, rtol=1e-6)
    torch.testing.assert_close(pairs[..., 1].double(), lo, atol=0, rtol=0)
    step = ((hi - lo) / 15).repeat_interleave(32, 1)
    back = q * step + lo.repeat_interleave(32, 1)
    assert ((back - w.double()).abs() <= step / 2 + 1e-6).all()


def test_plan_checks_the_int4_scheme():
    meta = {"K": 128, "N": 32, "has_bias": False, "has_residual": False, "max_T": 4, "max_S": 1, "T_bucket": 1}
    config = linear.default(meta)
    dtypes = {"x": "fp16", "w": "u8", "scale": "fp32", "out": "fp16"}
    with pytest.raises(ValueError, match="int4 needs a u8 w"):
        linear.plan({**meta, "quant": "int4", "group_size": 32}, {**dtypes, "w": "i8"}, config)
    with pytest.raises(ValueError, match="group_size 48"):
        linear.plan({**meta, "quant": "int4", "group_size": 48}, dtypes, config)
    with pytest.raises(ValueError, match="quant none"):  # a packed w on a node without the scheme
        linear.plan(meta, dtypes, config)
    launch = linear.plan({**meta, "quant": "int4", "group_size": 64}, dtypes, config).launches[0]
    cx = dict(launch.constexprs)
    assert cx["W_INT4"] is True and cx["W_INT8"] is False and cx["GROUP_SIZE"] == 64
    assert dict(launch.signature)["w_ptr"] == "*u8" and dict(launch.args)["scale_ptr"] == ("tensor", "scale")


@pytest.mark.parametrize("bucket", [1, 16, 64, 2048])
def test_int4_candidates_load_16_bytes(bucket):
    meta = {"K": 2048, "N": 5632, "eps": EPS, "has_bias": False, "act": "silu_mul", "quant": "int4", "group_size": 128,
            "max_T": 2048, "max_S": 32, "T_bucket": bucket}
    configs = rms_norm_linear.configs(meta)
    assert configs
    for config in [*configs, rms_norm_linear.default(meta)]:
        assert config["BLOCK_K"] >= 32, config


@pytest.mark.parametrize("op,bucket,group", [("linear", 1, 128), ("rms_norm_linear", 16, 32), ("linear", 2048, 64)])
def test_int4_cross_compiles(op, bucket, group):
    from tests.kernels.aot_util import assert_cross_compiles
    from tests.kernels.test_linear import assert_fits_shared_memory

    module = globals()[op]
    meta = {"K": 2048, "N": 5632, "has_bias": True, "has_residual": op == "linear", "eps": EPS, "quant": "int4",
            "group_size": group, "max_T": 2048, "max_S": 32, "T_bucket": bucket}
    dtypes = {"x": "bf16", "w": "u8", "scale": "fp32", "bias": "bf16", "out": "bf16",
              **({"residual": "bf16"} if op == "linear" else {})}
    assert assert_cross_compiles(module.SPEC, meta, dtypes) >= 3
    assert_fits_shared_memory(module.SPEC, meta, dtypes)
