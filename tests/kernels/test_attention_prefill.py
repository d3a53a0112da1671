import itertools

import pytest
import torch

from kernels.attention_prefill import SPEC, attention_prefill, configs, default, reference
from kernels.spec import Config

BLOCK_SIZE = 16
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 3e-3, 3e-3)]
# (q_len, kv_len) per sequence; kv_len - q_len tokens are a cached prefix.
MIXED = [(7, 23), (16, 16), (0, 0), (1, 40), (5, 37)]  # prefix + new, a full block, empty, one new token
HEADS = [(2, 2, 64), (8, 2, 80), (4, 1, 128), (8, 1, 64)]  # GQA ratio 1, 4, 4 (MQA), 8 (MQA)


def paged_kv(kv_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator,
             device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches holding random k/v for each sequence's tokens in shuffled blocks, NaN everywhere else
    (block 0, spare blocks, the tail of each last block), and block tables padded with zeros (block 0).

    Any read of a slot that belongs to no token shows up as NaN in the output.
    """
    need = [-(-n // BLOCK_SIZE) for n in kv_lens]
    num_blocks = sum(need) + 3
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    tables = torch.zeros(len(kv_lens), max(need, default=0) + 1, dtype=torch.int32)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    rows = (-1, num_kv_heads, head_dim)
    for s, n in enumerate(kv_lens):
        blocks = [free.pop() for _ in range(need[s])]
        tables[s, : need[s]] = torch.tensor(blocks, dtype=torch.int32)
        tokens = torch.arange(n)
        slots = (tables[s, tokens // BLOCK_SIZE].long() * BLOCK_SIZE + tokens % BLOCK_SIZE).to(device)
        k_cache.view(rows)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device, dtype)
        v_cache.view(rows)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    return k_cache, v_cache, tables.to(device)


def qkv_rows(T: int, hq: int, hk: int, dh: int, dtype: torch.dtype, gen: torch.Generator,
             device: str = "cpu") -> torch.Tensor:
    """Random q columns; the k and v columns are NaN because attention must read k/v from the cache only."""
    qkv = torch.full((T, (hq + 2 * hk) * dh), float("nan"))
    qkv[:, : hq * dh] = torch.randn(T, hq * dh, generator=gen)
    return qkv.to(device, dtype)


def prefill_case(seqs: list[tuple[int, int]], hq: int, hk: int, dh: int, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q_lens = [q for q, _ in seqs]
    k_cache, v_cache, tables = paged_kv([kv for _, kv in seqs], hk, dh, dtype, gen)
    T = sum(q_lens)
    return {"qkv": qkv_rows(T, hq, hk, dh, dtype, gen), "k_cache": k_cache, "v_cache": v_cache,
            "cu_seqlens_q": torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
            "seq_lens": torch.tensor([kv for _, kv in seqs], dtype=torch.int32), "block_tables": tables}


def attrs(hq: int, hk: int, dh: int) -> dict:
    return {"num_q_heads": hq, "num_kv_heads": hk, "head_dim": dh, "scale": dh**-0.5}


def run_prefill(case: dict, hq: int, hk: int, dh: int, config: Config | None = None) -> torch.Tensor:
    qkv = case["qkv"]
    out = torch.full((qkv.shape[0], hq * dh), float("nan"), dtype=qkv.dtype)
    return attention_prefill(**case, **attrs(hq, hk, dh), block_size=BLOCK_SIZE, out=out, config=config)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hk,dh", HEADS)
def test_varlen_batch_matches_reference(hq, hk, dh, dtype, atol, rtol):
    case = prefill_case(MIXED, hq, hk, dh, dtype, seed=hq * 100 + hk * 10 + dh)
    out = run_prefill(case, hq, hk, dh)
    torch.testing.assert_close(out, reference(**case, **attrs(hq, hk, dh)), atol=atol, rtol=rtol)


@pytest.mark.parametrize("seqs", [[(1, 1)], [(1, 17)], [(21, 21)], [(3, 48)]], ids=str)
def test_single_sequence(seqs):
    case = prefill_case(seqs, 4, 2, 64, torch.float32, seed=len(seqs) + seqs[0][1])
    torch.testing.assert_close(run_prefill(case, 4, 2, 64), reference(**case, **attrs(4, 2, 64)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", configs({"num_q_heads": 8, "num_kv_heads": 2, "head_dim": 64}), ids=str)
def test_every_config(config):
    case = prefill_case(MIXED, 8, 2, 64, torch.float32, seed=7)
    torch.testing.assert_close(run_prefill(case, 8, 2, 64, config), reference(**case, **attrs(8, 2, 64)),
                               atol=1e-5, rtol=1e-5)


def test_small_tiles_with_an_odd_group():
    # GROUP 3 in 16-row tiles: 5 tokens per tile and a 16th row that would alias the next tile's token;
    # 16-key tiles make every sequence cross several tile boundaries.
    case = prefill_case(MIXED, 6, 2, 64, torch.float32, seed=11)
    out = run_prefill(case, 6, 2, 64, Config.make(BLOCK_M=16, BLOCK_N=16))
    torch.testing.assert_close(out, reference(**case, **attrs(6, 2, 64)), atol=1e-5, rtol=1e-5)


def test_reference_matches_dense_causal_attention():
    # The reference gathers paged blocks; check it against SDPA on contiguous k/v with the prefix offset.
    hq, hk, dh = 4, 2, 64
    case = prefill_case(MIXED, hq, hk, dh, torch.float32, seed=3)
    ref = reference(**case, **attrs(hq, hk, dh))
    cu = case["cu_seqlens_q"].tolist()
    for s, (q_len, kv_len) in enumerate(MIXED):
        if q_len == 0:
            continue
        tokens = torch.arange(kv_len)
        slots = case["block_tables"][s, tokens // BLOCK_SIZE].long() * BLOCK_SIZE + tokens % BLOCK_SIZE
        k = case["k_cache"].view(-1, hk, dh)[slots].transpose(0, 1).repeat_interleave(hq // hk, dim=0)
        v = case["v_cache"].view(-1, hk, dh)[slots].transpose(0, 1).repeat_interleave(hq // hk, dim=0)
        q = case["qkv"][cu[s]:cu[s + 1], : hq * dh].view(q_len, hq, dh).transpose(0, 1)
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(ref[cu[s]:cu[s + 1]], dense.transpose(0, 1).reshape(q_len, -1),
                                   atol=1e-5, rtol=1e-5)


def test_configs_fit_the_group():
    for group in (1, 3, 8, 32, 64):
        meta = {"num_q_heads": group * 2, "num_kv_heads": 2, "head_dim": 128}
        assert all(c["BLOCK_M"] >= group for c in configs(meta)) and default(meta) in configs(meta)
    assert len(configs({"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 256})) <= 6


def _meta(hq: int, hk: int, dh: int) -> dict:
    return {**attrs(hq, hk, dh), "block_size": BLOCK_SIZE, "max_blocks": 256, "max_T": 2048, "max_S": 32}


def _dtypes(dtype: str) -> dict:
    return {"qkv": dtype, "k_cache": dtype, "v_cache": dtype, "cu_seqlens_q": "i32", "seq_lens": "i32",
            "block_tables": "i32", "out": dtype}


@pytest.mark.parametrize("dtype,heads", [("fp16", (32, 8, 128)), ("bf16", (32, 8, 128)),
                                         # fp32 models are the small ones; exact fp32 dots compile slowly.
                                         ("fp32", (9, 3, 64))])
def test_attention_prefill_cross_compiles(dtype, heads):
    from tests.kernels.aot_util import assert_cross_compiles

    assert assert_cross_compiles(SPEC, _meta(*heads), _dtypes(dtype)) >= 3


@pytest.mark.parametrize("heads", [(32, 32, 96), (8, 1, 256)])
def test_other_head_dims_cross_compile(heads):
    from compiler.aot import compile_launch
    from tests.kernels.aot_util import TARGETS

    meta = _meta(*heads)
    for launch in SPEC.plan(meta, _dtypes("bf16"), default(meta)).launches:
        for target in TARGETS:
            assert len(compile_launch(launch, target)[0]) > 1000
