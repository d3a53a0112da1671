import pytest
import torch

from artifact_format.kernel_index import eval_grid
from kernels.logits import SPEC, logits, reference
from kernels.spec import Config

EPS = 1e-5
# (T, D, V, R): rows taken from a larger x in shuffled order; D = 576 (SmolLM2) and 100 (no power of two, no
# multiple of any BLOCK_D), V a multiple of no BLOCK_V. R = 1 and 3 take the broadcast product, 17 and 40 tl.dot.
CASES = [(1, 64, 100, 1), (9, 100, 257, 3), (30, 576, 1000, 17), (50, 100, 333, 40), (45, 576, 130, 40)]
# The sums are fp32 in both; fp32 differs only in their order. The tl.dot layout rounds the normed activation
# to fp16 first (as HF's norm output is, before lm_head): 2^-11 relative per term, ~3e-4 typical on these O(1)
# outputs and under 2e-3 at the tail of a few thousand of them.
TOLERANCES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 3e-3, 3e-3)]


def _inputs(T, D, V, R, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) * 3 + 0.2).to(dtype)
    norm_w = (1 + 0.2 * torch.randn(D, generator=g)).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    last = torch.randperm(T, generator=g)[:R]
    last[0] = T - 1
    if R > 2:
        last[-1] = last[1]  # a row asked for twice
    return x, norm_w, weight, last.to(torch.int32)


def _poisoned(R, V):
    return torch.full((R, V), float("nan"), dtype=torch.float32)


def _check(out, x, norm_w, weight, last_idx, atol, rtol, msg=None):
    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out, reference(x, norm_w, weight, last_idx, eps=EPS), atol=atol, rtol=rtol, msg=msg)


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("T,D,V,R", CASES)
def test_logits_matches_reference(T, D, V, R, dtype, atol, rtol):
    x, norm_w, weight, last_idx = _inputs(T, D, V, R, dtype, seed=T + D + V + R)
    _check(logits(x, norm_w, weight, last_idx, eps=EPS, out=_poisoned(R, V)), x, norm_w, weight, last_idx,
           atol, rtol)


@pytest.mark.parametrize("R", [1, 3])
def test_logits_bf16_broadcast(R):
    # bf16 through the broadcast product only: the interpreter's tl.dot on bf16 is wrong (tested on the GPU).
    x, norm_w, weight, last_idx = _inputs(11, 100, 257, R, torch.bfloat16, seed=R)
    meta = {"D": 100, "V": 257, "eps": EPS, "max_T": 11, "max_S": R, "T_bucket": R}
    broadcast = [c for c in SPEC.configs(meta) if not c["USE_DOT"]]
    assert len(broadcast) >= 3
    for config in broadcast:
        out = logits(x, norm_w, weight, last_idx, eps=EPS, out=_poisoned(R, 257), config=config)
        _check(out, x, norm_w, weight, last_idx, 1e-4, 1e-4, msg=lambda m, c=config: f"{c}: {m}")


# Each bucket's candidates at that bucket's largest row count: 1, 3 (2 would pad 4), 13, 40, and 100 rows for
# the last bucket (max_S 100 > 64: 128-row dot tiles, and 64-row ones that loop over two row blocks).
BUCKET_ROWS = [(1, 1), (4, 3), (16, 13), (64, 40), (200, 100)]


@pytest.mark.parametrize("bucket,R", BUCKET_ROWS)
def test_logits_every_config(bucket, R):
    T, D, V = 120, 100, 300
    x, norm_w, weight, last_idx = _inputs(T, D, V, R, torch.float16, seed=bucket)
    meta = {"D": D, "V": V, "eps": EPS, "max_T": T, "max_S": 100, "T_bucket": bucket}
    candidates = SPEC.configs(meta)
    assert 3 <= len(candidates) <= 6
    for config in dict.fromkeys([*candidates, SPEC.default(meta)]):
        out = logits(x, norm_w, weight, last_idx, eps=EPS, out=_poisoned(R, V), config=config)
        _check(out, x, norm_w, weight, last_idx, 3e-3, 3e-3, msg=lambda m, c=config: f"{c}: {m}")


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("block_r,use_dot,R", [(1, False, 5), (4, False, 10), (16, True, 40)])
def test_logits_loops_over_row_blocks(block_r, use_dot, R, dtype, atol, rtol):
    # More rows than BLOCK_R: every row block, the last one partial, must be written.
    x, norm_w, weight, last_idx = _inputs(60, 96, 70, R, dtype, seed=R)
    config = Config.make(num_warps=4, num_stages=3, BLOCK_R=block_r, BLOCK_V=32, BLOCK_D=64, USE_DOT=use_dot)
    out = logits(x, norm_w, weight, last_idx, eps=EPS, out=_poisoned(R, 70), config=config)
    _check(out, x, norm_w, weight, last_idx, atol, rtol)


def test_logits_reference_is_norm_then_lm_head():
    # The reference against the textbook two-step form, so both are not wrong the same way.
    x, norm_w, weight, _ = _inputs(5, 40, 60, 2, torch.float32, seed=9)
    rows = x[[4, 0]]
    normed = rows / torch.sqrt((rows * rows).sum(-1, keepdim=True) / 40 + EPS) * norm_w
    last_idx = torch.tensor([4, 0], dtype=torch.int32)
    torch.testing.assert_close(reference(x, norm_w, weight, last_idx, eps=EPS), normed @ weight.T)


def test_logits_row_stride():
    x_wide, norm_w, weight, last_idx = _inputs(6, 180, 70, 2, torch.float32, seed=4)
    x = x_wide[:, :96]
    norm_w, weight = norm_w[:96].contiguous(), weight[:, :96].contiguous()
    for R in (1, 2):
        out = logits(x, norm_w, weight, last_idx[:R], eps=EPS, out=_poisoned(R, 70))
        _check(out, x, norm_w, weight, last_idx[:R], 1e-4, 1e-4)


@pytest.mark.parametrize("bucket", [*SPEC.tune_buckets, 2048])
@pytest.mark.parametrize("D,V", [(576, 49152), (2048, 32000), (4096, 128256)])
def test_logits_reads_weight_once_per_launch(D, V, bucket):
    # The grid covers the vocabulary only, whatever R, and the heuristic's row block holds every row the bucket
    # can bring (R <= max_S), so each weight element is loaded by one program, once.
    meta = {"D": D, "V": V, "eps": EPS, "max_T": 2048, "max_S": 64, "T_bucket": bucket}
    dtypes = {"x": "bf16", "norm_w": "bf16", "weight": "bf16", "last_idx": "i32", "out": "fp32"}
    config = SPEC.default(meta)
    (launch,) = SPEC.plan(meta, dtypes, config).launches
    grids = {eval_grid(launch.grid, {"T": 2048, "S": r, "R": r}) for r in (1, 7, 64)}
    assert grids == {(-(-V // config["BLOCK_V"]),)}
    assert config["BLOCK_R"] >= min(bucket, 64)
    assert grids.pop()[0] >= 3 * 132  # a few programs per SM on an H100 (132 SMs)


# Every regime once: 1-row broadcast (bf16), 4-row broadcast and 16-row dots (fp16), 32-row dots (bf16), 64- and
# 128-row dots, the largest tiles, in bf16 and in fp32 (two stages, twice the bytes: the shared-memory worst case).
COMPILE_CASES = [("bf16", 1, 32), ("fp16", 4, 32), ("bf16", 64, 32), ("bf16", 2048, 256), ("fp32", 2048, 256)]


@pytest.mark.parametrize("dtype,bucket,max_S", COMPILE_CASES)
def test_logits_cross_compiles(dtype, bucket, max_S):
    from tests.kernels.aot_util import assert_cross_compiles
    from tests.kernels.test_linear import assert_fits_shared_memory

    meta = {"D": 2048, "V": 32000, "eps": 1e-5, "max_T": 2048, "max_S": max_S, "T_bucket": bucket}
    dtypes = {"x": dtype, "norm_w": dtype, "weight": dtype, "last_idx": "i32", "out": "fp32"}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3 * 3
    assert_fits_shared_memory(SPEC, meta, dtypes)
