"""Sliding-window attention (Mistral): prefill and decode kernels against attention written from the maths.

The query at position p sees keys at positions p - window < n <= p (transformers' sliding_window_overlay).
The cache slots of keys that no tile needs are NaN-poisoned, as is the output: a kernel that loads a block
wholly outside the window, or leaves a row unwritten, fails.
"""

import pytest
import torch

from kernels import attention_decode, attention_prefill
from kernels.spec import Config
from tests.kernels.test_attention_decode import _dtypes as decode_dtypes
from tests.kernels.test_attention_decode import decode_case
from tests.kernels.test_attention_prefill import BLOCK_SIZE, attrs, prefill_case
from tests.kernels.test_attention_prefill import _dtypes as prefill_dtypes

# (q_len, kv_len): a cached prefix longer than the window, a fresh prompt, one new token, a full block, empty.
MIXED = [(7, 45), (29, 29), (1, 40), (16, 16), (0, 0)]
WINDOWS = [1, 3, 5, 16, 17, 100]  # a window of one, awkward, one block, one past a block, longer than any sequence


def windowed(case: dict, q_pos: list[list[int]], hq: int, hk: int, dh: int, window: int) -> list[torch.Tensor]:
    """softmax(q k^T / sqrt(dh)) v per sequence and query, over exactly the keys p - window < n <= p, fp64."""
    out = []
    for s, positions in enumerate(q_pos):
        table = case["block_tables"][s]
        rows = []
        for p, q in positions:
            keys = range(max(0, p - window + 1), p + 1)
            k = torch.stack([case["k_cache"][table[n // BLOCK_SIZE], n % BLOCK_SIZE] for n in keys]).double()
            v = torch.stack([case["v_cache"][table[n // BLOCK_SIZE], n % BLOCK_SIZE] for n in keys]).double()
            q = q.double().view(hq, dh)
            rows.append(torch.stack([torch.softmax(k[:, h // (hq // hk)] @ q[h] * dh**-0.5, 0) @ v[:, h // (hq // hk)]
                                     for h in range(hq)]).reshape(-1))
        out.append(torch.stack(rows) if rows else torch.zeros(0, hq * dh, dtype=torch.float64))
    return out


def poison_before(case: dict, starts: list[int]) -> None:
    """NaN into the cache slots of every sequence's keys at positions < starts[s]."""
    for s, start in enumerate(starts):
        for n in range(start):
            block = case["block_tables"][s, n // BLOCK_SIZE]
            case["k_cache"][block, n % BLOCK_SIZE] = float("nan")
            case["v_cache"][block, n % BLOCK_SIZE] = float("nan")


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("hq,hk,dh,block_m,block_n", [(4, 2, 16, 16, 16), (6, 2, 24, 32, 16), (2, 1, 32, 16, 32)])
def test_prefill_window(window, hq, hk, dh, block_m, block_n):
    case = prefill_case(MIXED, hq, hk, dh, torch.float32, seed=window * 7 + hq)
    cu = case["cu_seqlens_q"].tolist()
    q = case["qkv"][:, : hq * dh]
    q_pos = [[(kv - ql + i, q[cu[s] + i]) for i in range(ql)] for s, (ql, kv) in enumerate(MIXED)]
    expected = torch.cat(windowed(case, q_pos, hq, hk, dh, window)).float()
    torch.testing.assert_close(attention_prefill.reference(**case, **attrs(hq, hk, dh), window=window), expected,
                               atol=1e-5, rtol=1e-5)
    # Keys before the first query's window are read by no tile of its sequence.
    poison_before(case, [max(0, kv - ql - window + 1) if ql else kv for ql, kv in MIXED])
    out = torch.full_like(expected, float("nan"))
    attention_prefill.attention_prefill(**case, **attrs(hq, hk, dh), block_size=BLOCK_SIZE, window=window, out=out,
                                        config=Config.make(BLOCK_M=block_m, BLOCK_N=block_n))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("splits,block_n", [(1, 16), (3, 16), (2, 32)])
def test_decode_window(window, splits, block_n):
    hq, hk, dh = 6, 2, 24
    lens = [45, 1, 0, 16, 17, 33]
    case = decode_case(lens, hq, hk, dh, torch.float32, seed=window * 10 + splits)
    q = case["qkv"][:, : hq * dh]
    q_pos = [[(n - 1, q[s])] if n else [] for s, n in enumerate(lens)]
    expected = torch.cat([r if len(r) else torch.zeros(1, hq * dh, dtype=torch.float64)
                          for r in windowed(case, q_pos, hq, hk, dh, window)]).float()
    torch.testing.assert_close(attention_decode.reference(**case, **attrs(hq, hk, dh), window=window), expected,
                               atol=1e-5, rtol=1e-5)
    poison_before(case, [max(0, n - window) for n in lens])  # outside the window: never loaded
    out = torch.full_like(expected, float("nan"))
    attention_decode.attention_decode(**case, **attrs(hq, hk, dh), block_size=BLOCK_SIZE, window=window, out=out,
                                      config=Config.make(BLOCK_N=block_n, NUM_SPLITS=splits))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_no_window_builds_the_windowless_kernel():
    # A node without a window attr and one with window 0 plan the same launch: full-attention models keep
    # their binaries (and tuning keys, which list the attrs).
    meta = {**attrs(8, 2, 64), "block_size": BLOCK_SIZE, "max_blocks": 64, "max_T": 64, "max_S": 4, "T_bucket": 4}
    for spec, dtypes in ((attention_prefill.SPEC, prefill_dtypes("fp16")), (attention_decode.SPEC,
                                                                             decode_dtypes("fp16"))):
        config = spec.default(meta)
        plain, zero = spec.plan(meta, dtypes, config), spec.plan({**meta, "window": 0}, dtypes, config)
        assert plain == zero and dict(plain.launches[0].constexprs)["USE_WINDOW"] is False
        windowed_plan = spec.plan({**meta, "window": 4096}, dtypes, config)
        assert dict(windowed_plan.launches[0].constexprs)["WINDOW"] == 4096


def test_decode_splits_follow_the_window():
    # A 4096-token window in a 32k-token cache reads at most 4096 keys, so it needs fewer splits.
    meta = {**attrs(32, 8, 128), "block_size": BLOCK_SIZE, "max_blocks": 2048, "max_T": 1, "max_S": 1,
            "T_bucket": 1}
    full, short = attention_decode.default(meta), attention_decode.default({**meta, "window": 512})
    assert short["NUM_SPLITS"] < full["NUM_SPLITS"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_windowed_attention_cross_compiles(dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    heads = {"bf16": (32, 8, 128), "fp32": (9, 3, 64)}[dtype]
    meta = {**attrs(*heads), "block_size": BLOCK_SIZE, "max_blocks": 256, "max_T": 256, "max_S": 8, "T_bucket": 8,
            "window": 4096}
    assert assert_cross_compiles(attention_prefill.SPEC, meta, prefill_dtypes(dtype)) >= 3
    assert assert_cross_compiles(attention_decode.SPEC, meta, decode_dtypes(dtype)) >= 3
