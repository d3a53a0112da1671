import pytest
import torch

from kernels.attention_decode import SPEC, attention_decode, configs, default, reference
from kernels.spec import Config
from tests.kernels.test_attention_prefill import BLOCK_SIZE, attrs, paged_kv, qkv_rows

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
# kv length per sequence: one token, mid-block, a padding row, exactly one block, several blocks.
LENS = [1, 17, 0, 16, 40, 71]
HEADS = [(2, 2, 64), (8, 2, 80), (4, 1, 128), (8, 1, 64), (6, 2, 64)]  # GQA ratio 1, 4, 4 (MQA), 8 (MQA), 3


def decode_case(lens: list[int], hq: int, hk: int, dh: int, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = paged_kv(lens, hk, dh, dtype, gen)
    return {"qkv": qkv_rows(len(lens), hq, hk, dh, dtype, gen), "k_cache": k_cache, "v_cache": v_cache,
            "seq_lens": torch.tensor(lens, dtype=torch.int32), "block_tables": tables}


def run_decode(case: dict, hq: int, hk: int, dh: int, config: Config | None = None) -> torch.Tensor:
    out = torch.full((len(case["seq_lens"]), hq * dh), float("nan"), dtype=case["qkv"].dtype)
    return attention_decode(**case, **attrs(hq, hk, dh), block_size=BLOCK_SIZE, out=out, config=config)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hk,dh", HEADS)
def test_decode_matches_reference(hq, hk, dh, dtype, atol, rtol):
    case = decode_case(LENS, hq, hk, dh, dtype, seed=hq * 100 + hk * 10 + dh)
    # Several splits, one of them with nothing to do for the short rows, so both launches run.
    out = run_decode(case, hq, hk, dh, Config.make(BLOCK_N=16, NUM_SPLITS=3))
    torch.testing.assert_close(out, reference(**case, **attrs(hq, hk, dh)), atol=atol, rtol=rtol)
    assert (out[LENS.index(0)] == 0).all(), "a padding row must give zeros"


@pytest.mark.parametrize("splits,block_n", [(1, 16), (1, 64), (2, 32), (4, 16), (8, 32)])
def test_split_counts(splits, block_n):
    # 8 splits of 32-key tiles leave most splits of every row empty; 1 split writes out directly.
    case = decode_case(LENS, 8, 2, 64, torch.float32, seed=splits * 10 + block_n)
    out = run_decode(case, 8, 2, 64, Config.make(BLOCK_N=block_n, NUM_SPLITS=splits))
    torch.testing.assert_close(out, reference(**case, **attrs(8, 2, 64)), atol=1e-5, rtol=1e-5)


def test_default_config_and_single_row():
    for lens in ([5], [0], [33]):
        case = decode_case(lens, 4, 2, 64, torch.float16, seed=lens[0])
        out = run_decode(case, 4, 2, 64)
        torch.testing.assert_close(out, reference(**case, **attrs(4, 2, 64)), atol=2e-3, rtol=2e-3)


def test_all_padding_rows_give_zeros():
    case = decode_case([0, 0, 0], 4, 1, 64, torch.float32, seed=5)
    for splits in (1, 4):
        out = run_decode(case, 4, 1, 64, Config.make(BLOCK_N=32, NUM_SPLITS=splits))
        assert (out == 0).all()


def test_reference_is_softmax_over_the_gathered_context():
    # One row, written out by hand: softmax(q k^T * scale) v per q head over its kv head's tokens.
    hq, hk, dh, n = 4, 2, 64, 21
    case = decode_case([n], hq, hk, dh, torch.float32, seed=9)
    table = case["block_tables"][0]
    k = torch.stack([case["k_cache"][table[i // BLOCK_SIZE], i % BLOCK_SIZE] for i in range(n)])  # [n, Hk, Dh]
    v = torch.stack([case["v_cache"][table[i // BLOCK_SIZE], i % BLOCK_SIZE] for i in range(n)])
    q = case["qkv"][0, : hq * dh].view(hq, dh)
    expected = torch.stack([torch.softmax(k[:, h // 2] @ q[h] * dh**-0.5, 0) @ v[:, h // 2] for h in range(hq)])
    torch.testing.assert_close(reference(**case, **attrs(hq, hk, dh))[0], expected.reshape(-1))


def _meta(hq: int, hk: int, dh: int, bucket: int, max_blocks: int = 256) -> dict:
    return {**attrs(hq, hk, dh), "block_size": BLOCK_SIZE, "max_blocks": max_blocks, "max_T": 32, "max_S": 32,
            "T_bucket": bucket}


def test_split_heuristic():
    # Few sequences need more splits to fill the GPU; short contexts need fewer; always a candidate config.
    one, many = default(_meta(32, 8, 128, 1)), default(_meta(32, 8, 128, 32))
    assert one["NUM_SPLITS"] > many["NUM_SPLITS"] >= 1
    assert default(_meta(32, 8, 128, 1, max_blocks=8))["NUM_SPLITS"] == 1  # 128 tokens: not worth a split
    for bucket in SPEC.tune_buckets:
        meta = _meta(32, 8, 128, bucket)
        assert default(meta) in configs(meta) and len(configs(meta)) <= 6


def test_scratch_is_sized_for_max_S():
    meta = _meta(32, 8, 128, 1)
    config = Config.make(BLOCK_N=64, NUM_SPLITS=4)
    scratch = dict(SPEC.plan(meta, _dtypes("bf16"), config).scratch)
    assert scratch == {"partial_out": (32 * 32 * 4 * 128, "fp32"), "partial_lse": (32 * 32 * 4, "fp32")}
    assert SPEC.plan(meta, _dtypes("bf16"), Config.make(BLOCK_N=64, NUM_SPLITS=1)).scratch == ()


def _dtypes(dtype: str) -> dict:
    return {"qkv": dtype, "k_cache": dtype, "v_cache": dtype, "seq_lens": "i32", "block_tables": "i32", "out": dtype}


@pytest.mark.parametrize("dtype,heads", [("fp16", (32, 8, 128)), ("bf16", (32, 8, 128)),
                                         # fp32 models are the small ones; exact fp32 dots compile slowly.
                                         ("fp32", (9, 3, 64))])
def test_attention_decode_cross_compiles(dtype, heads):
    from tests.kernels.aot_util import assert_cross_compiles

    assert assert_cross_compiles(SPEC, _meta(*heads, bucket=8), _dtypes(dtype)) >= 3


@pytest.mark.parametrize("heads", [(32, 32, 96), (8, 1, 256)])
def test_other_head_dims_cross_compile(heads):
    from compiler.aot import compile_launch
    from tests.kernels.aot_util import TARGETS

    meta = _meta(*heads, bucket=1)
    plan = SPEC.plan(meta, _dtypes("bf16"), default(meta))
    assert len(plan.launches) == 2, "bucket 1 at a 4096-token context should split"
    for launch in plan.launches:
        for target in TARGETS:
            assert len(compile_launch(launch, target)[0]) > 1000
