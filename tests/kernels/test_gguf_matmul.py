"""The kernels on GGUF tensors served natively (--quant gguf): every native type's blocks, repacked by the compiler
(compiler/frontends/gguf_blocks.py: Q4_0 / Q4_1 / Q4_K as int4 per 32, Q5_K / Q8_0 as int8_group per 32, Q6_K as
int8_group per 16), through linear, rms_norm_linear (norm weight applied to x, GEMV and GEMM layouts, split-K on and
off), embedding and logits, against the maths in fp64 on gguf's own dequantization of the same blocks, the independent
reference. Shapes are awkward (odd N, K of 3 groups, one row and many); outputs are NaN-poisoned before the run.
"""

import pytest
import torch

from compiler.frontends.gguf_blocks import NATIVE_TYPES, repack
from kernels import embedding, linear, logits, rms_norm_linear
from kernels.matmul_configs import gemm, gemv
from tests.gguf_synth import dequantized, random_blocks

EPS = 1e-5
CONFIGS = {"gemv1": gemv(1, 16, 32, 1, False), "gemv4_split2": gemv(4, 16, 64, 2, False),
           "gemv_dot": gemv(16, 32, 32, 1, True), "gemm": gemm(32, 16, 64, 4), "default": None}


def _weight(type_name: str, N: int, K: int, seed: int):
    """(w, scale) as the kernels read them, and gguf's dequantized W [N, K] fp64."""
    data = random_blocks(type_name, N, K, seed)
    _, w, scale = repack(type_name, data, N, K)
    return w, scale, torch.from_numpy(dequantized(type_name, data)).double()


def _k(type_name: str) -> int:
    return 256 if type_name.endswith("_K") else 96  # one super-block, or three blocks of 32


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def _x(T, K, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, K, generator=g) * 2 + 0.1).to(dtype)


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
@pytest.mark.parametrize("name,T", [("gemv1", 1), ("gemv4_split2", 3), ("gemv_dot", 5), ("gemm", 19),
                                    ("default", 2)])
def test_gguf_linear_bias_residual(type_name, name, T):
    N, K = 37, _k(type_name)
    w, scale, W = _weight(type_name, N, K, seed=T)
    x = _x(T, K, seed=T + 1)
    g = torch.Generator().manual_seed(7)
    bias, residual = torch.randn(N, generator=g), torch.randn(T, N, generator=g)
    out = linear.linear(x, w, bias, residual, scale=scale, out=_nan(T, N), config=CONFIGS[name])
    want = x.double() @ W.T + bias.double() + residual.double()
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(linear.reference(x, w, bias, residual, scale=scale).double(), want, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
@pytest.mark.parametrize("name,T,act", [("gemv1", 1, "silu_mul"), ("gemv4_split2", 4, None), ("gemm", 19, None),
                                        ("gemv_dot", 17, "silu_mul")])
def test_gguf_rms_norm_linear_norm_w(type_name, name, T, act):
    N, K = 38, _k(type_name)
    w, scale, W = _weight(type_name, N, K, seed=T + 3)
    x = _x(T, K, seed=T)
    norm_w = 1 + 0.3 * torch.randn(K, generator=torch.Generator().manual_seed(1))
    N_out = N // 2 if act else N
    out = rms_norm_linear.rms_norm_linear(x, w, scale=scale, norm_w=norm_w, eps=EPS, act=act,
                                          out=_nan(T, N_out), config=CONFIGS[name])
    xd = x.double()
    y = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * ((xd * norm_w.double()) @ W.T)
    if act:
        y = torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2]
    torch.testing.assert_close(out.double(), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0"])
def test_gguf_linear_fp16_tiles(type_name):
    # fp16 activations on tensor cores: each dequantized weight rounded once to fp16 (~5e-4 relative).
    N, K, T = 40, _k(type_name), 20
    w, scale, W = _weight(type_name, N, K, seed=2)
    x = _x(T, K, seed=3, dtype=torch.float16)
    out = linear.linear(x, w, scale=scale, out=_nan(T, N, dtype=torch.float16), config=CONFIGS["gemm"])
    want = x.double() @ W.T
    # the random K-type blocks give weights up to ~40, so the bound is relative to the outputs' scale
    torch.testing.assert_close(out.double(), want, atol=2e-3 * want.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
@pytest.mark.parametrize("block", [None, 32])
def test_gguf_embedding(type_name, block):
    from kernels.spec import Config

    V, D = 29, _k(type_name)
    table, weight_scale, W = _weight(type_name, V, D, seed=V)
    ids = torch.tensor([0, 28, 5, 5, 40, 13], dtype=torch.int32)  # 40 lies outside the table: a zero row
    config = Config.make(num_warps=1, num_stages=1, BLOCK_D=block) if block else None
    out = embedding.embedding(ids, table, _nan(6, D), weight_scale=weight_scale, config=config)
    want = torch.zeros(6, D, dtype=torch.float64)
    valid = ids < V
    want[valid] = W[ids[valid].long()]
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
    ok = ids[valid]
    torch.testing.assert_close(embedding.reference(ok, table, weight_scale).double(), W[ok.long()], atol=0, rtol=0)


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
@pytest.mark.parametrize("T,R", [(5, 1), (6, 3), (20, 17)])
def test_gguf_logits(type_name, T, R):
    V, D = 45, _k(type_name)
    table, weight_scale, W = _weight(type_name, V, D, seed=R)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g) * 3 + 0.2
    norm_w = 1 + 0.5 * torch.randn(D, generator=g)
    idx = torch.randint(0, T, (R,), generator=g, dtype=torch.int32)
    out = logits.logits(x, norm_w, table, idx, eps=EPS, weight_scale=weight_scale, out=_nan(R, V))
    h = x[idx.long()].double()
    want = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double()) @ W.T
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


# The heuristic default of a few layouts only (every candidate would take minutes of CI): the GEMV at one row with
# the norm weight and SwiGLU, group 16 (Q6_K); the GEMM tiles of prefill, group 32; the tables.
CROSS = [("rms_norm_linear", 1, 16), ("linear", 2048, 32), ("logits", 1, 32), ("embedding", 1, 32)]


@pytest.mark.parametrize("op,bucket,group", CROSS)
def test_int8_group_cross_compiles(op, bucket, group):
    from compiler.aot import compile_launch
    from tests.kernels.aot_util import TARGETS

    quant = {"quant": "int8_group", "group_size": group, "max_T": 2048, "max_S": 32, "T_bucket": bucket}
    module, meta, dtypes = {
        "rms_norm_linear": (rms_norm_linear, {"K": 2048, "N": 5632, "has_bias": False, "eps": EPS, "act": "silu_mul",
                                              "use_norm_w": True}, {"x": "bf16", "w": "i8", "norm_w": "bf16"}),
        "linear": (linear, {"K": 2048, "N": 5632, "has_bias": False, "has_residual": True},
                   {"x": "bf16", "w": "i8", "residual": "bf16"}),
        "logits": (logits, {"D": 576, "V": 49152, "eps": EPS}, {"x": "bf16", "norm_w": "bf16", "last_idx": "i32",
                                                                "weight": "i8"}),
        "embedding": (embedding, {"D": 576, "V": 49152}, {"ids": "i32", "weight": "i8"}),
    }[op]
    meta = {**meta, **quant}
    scale = "weight_scale" if op in ("logits", "embedding") else "scale"
    dtypes = {**dtypes, scale: "fp32", "out": "fp32" if op == "logits" else "bf16"}
    spec = module.SPEC
    for launch in spec.plan(meta, dtypes, spec.default(meta)).launches:
        assert dict(launch.constexprs)["GROUP_SIZE"] == group
        for target in TARGETS:
            binary, md = compile_launch(launch, target)
            assert len(binary) > 1000 and md["name"] == launch.name, f"{op} {target}"


def test_plan_checks_the_int8_group_scheme():
    meta = {"K": 96, "N": 8, "has_bias": False, "has_residual": False, "max_T": 1, "max_S": 1, "T_bucket": 1,
            "quant": "int8_group", "group_size": 64}
    dtypes = {"x": "fp32", "w": "i8", "scale": "fp32", "out": "fp32"}
    with pytest.raises(ValueError, match="quant int8_group: group_size 64 must be one of"):
        linear.plan(meta, dtypes, linear.default(meta))
    with pytest.raises(ValueError, match="int8_group needs a i8 w"):
        linear.plan({**meta, "group_size": 32}, {**dtypes, "w": "u8"}, linear.default(meta))
    launch = linear.plan({**meta, "group_size": 32}, dtypes, linear.default(meta)).launches[0]
    cx = dict(launch.constexprs)
    assert (cx["W_INT8"], cx["W_INT4"], cx["GROUP_SIZE"]) == (False, False, 32)
