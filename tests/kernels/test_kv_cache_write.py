import pytest
import torch

from kernels.kv_cache_write import SPEC, configs, kv_cache_write, reference

BLOCK_SIZE = 16
HEADS = [(2, 2, 64), (8, 2, 80), (4, 1, 128), (8, 1, 64), (6, 5, 96)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # a pure copy: bf16 is exact in the interpreter too


def _case(T: int, hq: int, hk: int, dh: int, dtype: torch.dtype, num_blocks: int, pad_every: int, seed: int):
    """qkv with distinct random rows, caches full of other random values, slots drawn without repeats
    from shuffled blocks (mid-block offsets included), every pad_every-th token a padding row (-1)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (hq + 2 * hk) * dh, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, dh, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, dh, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:T].to(torch.int32)
    if pad_every:
        slots[::pad_every] = -1
    return qkv, slots, k_cache, v_cache


def _check(qkv, slots, k_cache, v_cache, hq, hk, dh, config=None):
    attrs = {"num_q_heads": hq, "num_kv_heads": hk, "head_dim": dh}
    k_ref, v_ref = reference(qkv, slots, k_cache.clone(), v_cache.clone(), **attrs)
    k_out, v_out = kv_cache_write(qkv, slots, k_cache, v_cache, **attrs, block_size=BLOCK_SIZE, config=config)
    assert k_out is k_cache and v_out is v_cache, "the caches are updated in place"
    torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,dh", HEADS)
def test_kv_cache_write_matches_reference(hq, hk, dh, dtype):
    _check(*_case(37, hq, hk, dh, dtype, num_blocks=5, pad_every=4, seed=hq * 100 + hk * 10 + dh), hq, hk, dh)


@pytest.mark.parametrize("T", [1, 16, 50])
def test_token_counts(T):
    _check(*_case(T, 4, 2, 64, torch.float32, num_blocks=4, pad_every=0, seed=T), 4, 2, 64)


@pytest.mark.parametrize("config", configs({"num_kv_heads": 5, "num_q_heads": 10, "head_dim": 96}), ids=str)
def test_every_config_covers_the_row(config):
    # Hk * Dh = 480 is no multiple of any block: every config ends in a partial column tile.
    _check(*_case(9, 10, 5, 96, torch.float32, num_blocks=2, pad_every=3, seed=3), 10, 5, 96, config)


def test_padding_rows_write_nothing():
    qkv, slots, k_cache, v_cache = _case(8, 4, 2, 64, torch.float16, num_blocks=2, pad_every=1, seed=1)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    kv_cache_write(qkv, slots, k_cache, v_cache, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=BLOCK_SIZE)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def test_reference_places_k_and_v_heads():
    # k head h of a token is qkv columns (Hq + h) * Dh ..., v head h (Hq + Hk + h) * Dh ...;
    # slot = block * 16 + offset.
    hq, hk, dh = 2, 2, 3
    qkv = torch.arange(2 * (hq + 2 * hk) * dh, dtype=torch.float32).view(2, -1)
    k_cache, v_cache = torch.zeros(3, BLOCK_SIZE, hk, dh), torch.zeros(3, BLOCK_SIZE, hk, dh)
    reference(qkv, torch.tensor([2 * BLOCK_SIZE + 5, -1], dtype=torch.int32), k_cache, v_cache,
              num_q_heads=hq, num_kv_heads=hk, head_dim=dh)
    assert k_cache[2, 5].tolist() == [[6, 7, 8], [9, 10, 11]] and v_cache[2, 5].tolist() == [[12, 13, 14], [15, 16, 17]]
    assert k_cache.count_nonzero() == 6 and v_cache.count_nonzero() == 6


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_kv_cache_write_cross_compiles(dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": BLOCK_SIZE, "max_T": 2048,
            "max_S": 32}
    dtypes = {"qkv": dtype, "slot_mapping": "i32", "k_cache": dtype, "v_cache": dtype}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3
