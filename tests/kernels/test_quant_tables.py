"""Quantized embedding table and lm_head (embedding / logits with W_INT8 or W_INT4) against the maths written here,
in fp64: the [V, D] table W = q * scale[v] (int8, one fp32 scale per vocabulary row) or q * scale + min per group of
G consecutive d of a row (int4, two q per byte, k = 2j in the low nibble of byte j); embedding out[t] = W[ids[t]]
(times Gemma's scale; zeros for an id outside [0, V)), logits out[r] = (rms_norm(x[last_idx[r]]) * norm_w) @ W^T,
soft-capped or not.

q, scales and mins are drawn here at random and packed here (tests/kernels/test_int4_matmul.py's _int4_weight), not
made by the compiler's quantizer. Every layout runs: D chunks shorter than, equal to and longer than a group, a last
chunk half past D, one row (broadcast GEMV), a few rows and tensor-core tiles. Outputs are NaN-poisoned.
"""

import pytest
import torch

from kernels import embedding, logits
from kernels.spec import Config
from tests.kernels.test_int4_matmul import _int4_weight

EPS = 1e-5
GROUP = 32


def _table(scheme: str, V: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the table as the kernels read it, its weight_scale, W [V, D] fp64)."""
    if scheme == "int4":
        return _int4_weight(V, D, GROUP, seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (V, D), generator=g, dtype=torch.int8)
    scale = torch.exp(torch.randn(V, generator=g)) / 127  # rows of very different scales
    return q, scale, q.double() * scale.double()[:, None]


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


# (V, D, BLOCK_D): D a multiple of the group; BLOCK_D None is the heuristic default.
EMBED_CASES = [(37, 96, 32), (37, 96, 64), (50, 160, 128), (50, 576, None), (9, 64, 256)]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("V,D,block", EMBED_CASES)
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_quantized_embedding(scheme, V, D, block, scale):
    table, weight_scale, W = _table(scheme, V, D, seed=V + D)
    ids = torch.tensor([0, 5, V - 1, 3, -1, V, 5], dtype=torch.int32)
    config = Config.make(num_warps=1, num_stages=1, BLOCK_D=block) if block else None
    out = embedding.embedding(ids, table, _nan(len(ids), D), scale=scale, weight_scale=weight_scale, config=config)
    want = torch.zeros(len(ids), D, dtype=torch.float64)
    for i, t in enumerate(ids.tolist()):
        if 0 <= t < V:  # an id outside the table gives a zero row
            want[i] = W[t] * scale
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    valid = ids.clamp(0, V - 1)
    ref = embedding.reference(valid, table, weight_scale, scale=scale, out_dtype="fp32")
    torch.testing.assert_close(ref.double(), W[valid.long()] * scale, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_quantized_embedding_16_bit_rows(out_dtype):
    table, weight_scale, W = _table("int4", 20, 96, seed=1)
    ids = torch.tensor([3, 19, 0], dtype=torch.int32)
    out = embedding.embedding(ids, table, _nan(3, 96, dtype=out_dtype), weight_scale=weight_scale)
    torch.testing.assert_close(out.double(), W[ids.long()].to(out_dtype).double(), atol=0, rtol=1e-2)


def _logits_maths(x, norm_w, W, idx, softcap):
    h = x[idx.long()].double()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double()
    out = h @ W.T
    return out if softcap == 0 else torch.tanh(out / softcap) * softcap


def _logits_inputs(T, R, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) * 3 + 0.2).to(dtype)
    norm_w = (1 + 0.5 * torch.randn(D, generator=g)).to(dtype)
    idx = torch.randint(0, T, (R,), generator=g, dtype=torch.int32)
    return x, norm_w, idx


def _logits_config(rows: int, block_v: int, block_d: int) -> Config:
    return Config.make(num_warps=4, num_stages=2, BLOCK_R=rows, BLOCK_V=block_v, BLOCK_D=block_d,
                       USE_DOT=rows >= 16)


# (T, R, V, D, config): one row, a few rows, tensor-core tiles; D chunks inside a group, equal, across groups, and a
# last chunk half past D (160 = 128 + 32).
LOGITS_CASES = [(5, 1, 70, 96, None), (5, 1, 70, 96, _logits_config(1, 16, 32)), (6, 3, 45, 160, None),
                (6, 3, 45, 160, _logits_config(4, 32, 128)), (20, 17, 50, 64, None),
                (20, 17, 50, 160, _logits_config(32, 16, 64))]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("T,R,V,D,config", LOGITS_CASES)
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_quantized_logits(scheme, T, R, V, D, config, softcap):
    x, norm_w, idx = _logits_inputs(T, R, D, torch.float32, seed=T + R + D)
    table, weight_scale, W = _table(scheme, V, D, seed=V * D)
    out = logits.logits(x, norm_w, table, idx, eps=EPS, softcap=softcap, weight_scale=weight_scale,
                        out=_nan(R, V), config=config)
    want = _logits_maths(x, norm_w, W, idx, softcap)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    ref = logits.reference(x, norm_w, table, idx, weight_scale, eps=EPS, softcap=softcap)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_logits_fp16_tiles(scheme):
    # fp16 activations on tensor cores: each dequantized weight rounded once to fp16 (~5e-4 relative).
    x, norm_w, idx = _logits_inputs(20, 18, 96, torch.float16, seed=3)
    table, weight_scale, W = _table(scheme, 40, 96, seed=4)
    out = logits.logits(x, norm_w, table, idx, eps=EPS, weight_scale=weight_scale, out=_nan(18, 40))
    torch.testing.assert_close(out.double(), _logits_maths(x, norm_w, W, idx, 0.0), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("bucket", [1, 16, 256])
def test_quantized_tables_cross_compile(scheme, bucket):
    from tests.kernels.aot_util import assert_cross_compiles

    dtypes = {"weight": {"int8": "i8", "int4": "u8"}[scheme], "weight_scale": "fp32"}
    quant = {"quant": scheme, **({"group_size": 128} if scheme == "int4" else {})}
    meta = {"D": 4096, "V": 128256, "eps": EPS, "softcap": 30.0, "max_T": 2048, "max_S": 256, "T_bucket": bucket,
            **quant}
    assert assert_cross_compiles(logits.SPEC, meta, {"x": "bf16", "norm_w": "bf16", "last_idx": "i32", "out": "fp32",
                                                     **dtypes}) >= 3
    if bucket == 1:
        meta = {"V": 128256, "D": 4096, "scale": 64.0, "max_T": 2048, "max_S": 256, **quant}
        assert assert_cross_compiles(embedding.SPEC, meta, {"ids": "i32", "out": "bf16", **dtypes}) >= 3


def test_plans_check_the_table_scheme():
    meta = {"V": 64, "D": 96, "max_T": 4, "max_S": 1}
    dtypes = {"ids": "i32", "weight": "u8", "weight_scale": "fp32", "out": "fp16"}
    with pytest.raises(ValueError, match="quant int4: group_size 64 must be one of .* and divide D = 96"):
        embedding.plan({**meta, "quant": "int4", "group_size": 64}, dtypes, embedding.default(meta))
    with pytest.raises(ValueError, match="quant none: weight is u8"):
        embedding.plan(meta, dtypes, embedding.default(meta))
    launch = embedding.plan(meta, {"ids": "i32", "weight": "fp16", "out": "fp16"}, embedding.default(meta)).launches[0]
    cx = dict(launch.constexprs)  # unquantized: the plain gather, the scale pointer bound to the table, unread
    assert cx["W_INT8"] is False and cx["W_INT4"] is False
    assert dict(launch.args)["weight_scale_ptr"] == ("tensor", "weight")
