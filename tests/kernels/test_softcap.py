"""Soft-capping (Gemma 2): attention scores and logits mapped to cap * tanh(z / cap), against the maths in fp64.

The caps are small next to the test's scores and logits, so a kernel that skips the cap (or applies it in the
wrong units: the attention kernels keep scores in log2 units) fails by far more than the tolerance. Outputs are
NaN-poisoned before each run.
"""

import pytest
import torch

from kernels import attention_decode, attention_prefill, logits
from kernels.spec import Config
from tests.kernels.test_attention_decode import _dtypes as decode_dtypes
from tests.kernels.test_attention_decode import decode_case
from tests.kernels.test_attention_prefill import BLOCK_SIZE, attrs, prefill_case
from tests.kernels.test_attention_prefill import _dtypes as prefill_dtypes

CAP = 0.7
MIXED = [(7, 45), (29, 29), (1, 40), (0, 0)]  # a cached prefix, a fresh prompt, one new token, empty


def capped(case: dict, q_pos: list[list[tuple[int, torch.Tensor]]], hq: int, hk: int, dh: int, cap: float,
           window: int = 0) -> torch.Tensor:
    """softmax(cap * tanh(q k^T / sqrt(dh) / cap)) v over keys p - window < n <= p (all n <= p without one), fp64."""
    rows = []
    for s, positions in enumerate(q_pos):
        table = case["block_tables"][s]
        for p, q in positions:
            keys = range(max(0, p - window + 1) if window else 0, p + 1)
            k = torch.stack([case["k_cache"][table[n // BLOCK_SIZE], n % BLOCK_SIZE] for n in keys]).double()
            v = torch.stack([case["v_cache"][table[n // BLOCK_SIZE], n % BLOCK_SIZE] for n in keys]).double()
            q = q.double().view(hq, dh)
            heads = []
            for h in range(hq):
                scores = k[:, h // (hq // hk)] @ q[h] * dh**-0.5
                heads.append(torch.softmax(torch.tanh(scores / cap) * cap, 0) @ v[:, h // (hq // hk)])
            rows.append(torch.stack(heads).reshape(-1))
    return torch.stack(rows).float()


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("hq,hk,dh,block_m,block_n", [(4, 2, 16, 16, 16), (6, 2, 24, 32, 16)])
def test_prefill_softcap(window, hq, hk, dh, block_m, block_n):
    case = prefill_case(MIXED, hq, hk, dh, torch.float32, seed=hq + window)
    case["qkv"][:, : hq * dh] *= 3  # scores of a few units: the cap bends them all
    cu = case["cu_seqlens_q"].tolist()
    q = case["qkv"][:, : hq * dh]
    q_pos = [[(kv - ql + i, q[cu[s] + i]) for i in range(ql)] for s, (ql, kv) in enumerate(MIXED)]
    expected = capped(case, q_pos, hq, hk, dh, CAP, window)
    kw = {**attrs(hq, hk, dh), "window": window, "softcap": CAP}
    torch.testing.assert_close(attention_prefill.reference(**case, **kw), expected, atol=1e-5, rtol=1e-5)
    uncapped = attention_prefill.reference(**case, **{**kw, "softcap": 0.0})
    assert (uncapped - expected).abs().max() > 0.05  # the cap matters at these scores
    out = torch.full_like(expected, float("nan"))
    attention_prefill.attention_prefill(**case, **kw, block_size=BLOCK_SIZE, out=out,
                                        config=Config.make(BLOCK_M=block_m, BLOCK_N=block_n))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 17])
@pytest.mark.parametrize("splits,block_n", [(1, 16), (3, 16)])
def test_decode_softcap(window, splits, block_n):
    hq, hk, dh = 6, 2, 24
    lens = [45, 1, 16, 33]
    case = decode_case(lens, hq, hk, dh, torch.float32, seed=splits + window)
    case["qkv"][:, : hq * dh] *= 3
    q = case["qkv"][:, : hq * dh]
    expected = capped(case, [[(n - 1, q[s])] for s, n in enumerate(lens)], hq, hk, dh, CAP, window)
    kw = {**attrs(hq, hk, dh), "window": window, "softcap": CAP}
    torch.testing.assert_close(attention_decode.reference(**case, **kw), expected, atol=1e-5, rtol=1e-5)
    out = torch.full_like(expected, float("nan"))
    attention_decode.attention_decode(**case, **kw, block_size=BLOCK_SIZE, out=out,
                                      config=Config.make(BLOCK_N=block_n, NUM_SPLITS=splits))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("R", [1, 3, 17])  # the broadcast product (1, 3 rows) and tl.dot (17)
def test_logits_softcap(R):
    T, D, V, cap = 20, 100, 257, 1.5
    g = torch.Generator().manual_seed(R)
    x = torch.randn(T, D, generator=g) * 3
    norm_w = 1 + 0.2 * torch.randn(D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.25  # logits of std ~3, twice the cap
    last_idx = torch.randperm(T, generator=g)[:R].to(torch.int32)
    h = x[last_idx.long()].double()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w.double()
    expected = (torch.tanh(h @ weight.double().T / cap) * cap).float()
    torch.testing.assert_close(logits.reference(x, norm_w, weight, last_idx, eps=1e-6, softcap=cap), expected,
                               atol=1e-5, rtol=1e-5)
    out = torch.full((R, V), float("nan"))
    logits.logits(x, norm_w, weight, last_idx, eps=1e-6, softcap=cap, out=out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_no_softcap_builds_the_plain_kernels():
    # Without the attr (every family but Gemma 2) the launch is the one a softcap of 0 gives, flag off.
    meta = {**attrs(8, 2, 64), "block_size": BLOCK_SIZE, "max_blocks": 64, "max_T": 64, "max_S": 4, "T_bucket": 4}
    for spec, dtypes in ((attention_prefill.SPEC, prefill_dtypes("fp16")), (attention_decode.SPEC,
                                                                             decode_dtypes("fp16"))):
        config = spec.default(meta)
        plain = spec.plan(meta, dtypes, config)
        assert plain == spec.plan({**meta, "softcap": 0.0}, dtypes, config)
        assert dict(plain.launches[0].constexprs)["USE_SOFTCAP"] is False
        on = dict(spec.plan({**meta, "softcap": 50.0}, dtypes, config).launches[0].constexprs)
        assert on["USE_SOFTCAP"] is True and on["SOFTCAP"] == pytest.approx(50.0 * 1.4426950408889634)
    lmeta = {"D": 64, "V": 300, "eps": 1e-6, "max_T": 8, "max_S": 4, "T_bucket": 4}
    ldt = {"x": "fp16", "norm_w": "fp16", "weight": "fp16", "last_idx": "i32", "out": "fp32"}
    plain = logits.plan(lmeta, ldt, logits.default(lmeta))
    assert dict(plain.launches[0].constexprs)["USE_SOFTCAP"] is False
    assert dict(logits.plan({**lmeta, "softcap": 30.0}, ldt, logits.default(lmeta)).launches[0].constexprs)[
        "SOFTCAP"] == 30.0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_softcapped_kernels_cross_compile(dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    heads = {"bf16": (8, 4, 256), "fp32": (4, 2, 16)}[dtype]  # Gemma 2's 2B heads, and the tiny preset's
    meta = {**attrs(*heads), "block_size": BLOCK_SIZE, "max_blocks": 256, "max_T": 256, "max_S": 8, "T_bucket": 8,
            "window": 4096, "softcap": 50.0}
    assert assert_cross_compiles(attention_prefill.SPEC, meta, prefill_dtypes(dtype)) >= 3
    assert assert_cross_compiles(attention_decode.SPEC, meta, decode_dtypes(dtype)) >= 3
    lmeta = {"D": 2304, "V": 256000, "eps": 1e-6, "softcap": 30.0, "max_T": 256, "max_S": 8, "T_bucket": 8}
    ldt = {"x": dtype, "norm_w": "fp32", "weight": dtype, "last_idx": "i32", "out": "fp32"}
    assert assert_cross_compiles(logits.SPEC, lmeta, ldt) >= 3
