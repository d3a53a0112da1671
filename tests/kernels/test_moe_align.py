"""The grouped moe form's count and align launches (kernels/moe_grouped.py) against a torch reference of the
layout they must produce: each expert's (token, k) pair indices in index order, expert by expert, each run padded to
whole BLOCK_M blocks; each block's expert (-1 past the last filled block, up to the grid's bound) and its filled
slots. Awkward sizes: token counts that are not multiples of the programs' span or of BLOCK_M, experts left empty,
one expert taking every pair, several programs (the long-prefill case scaled down)."""

import pytest
import torch

from kernels.moe import _grouped
from kernels.moe_grouped import align_span, launches, scratch
from kernels.spec import Plan, run


def _expected(ids: torch.Tensor, E: int, bm: int, num_blocks: int):
    """(sorted slots [NB * bm] with -1 where unfilled, block_expert [NB], block_rows [NB]) from the definition."""
    pairs = ids.flatten()
    slots, block_expert, block_rows = [], [], []
    for e in range(E):
        mine = torch.nonzero(pairs == e).flatten().tolist()  # ascending pair indices
        for b0 in range(0, len(mine), bm):
            run = mine[b0:b0 + bm]
            slots += run + [-1] * (bm - len(run))
            block_expert.append(e)
            block_rows.append(len(run))
    pad = num_blocks - len(block_expert)
    return (torch.tensor(slots + [-1] * pad * bm, dtype=torch.int32), torch.tensor(block_expert + [-1] * pad,
            dtype=torch.int32), torch.tensor(block_rows + [0] * pad, dtype=torch.int32))


def _align(ids: torch.Tensor, E: int, bm: int) -> dict[str, torch.Tensor]:
    T, top_k = ids.shape
    meta = {"E": E, "D": 16, "I": 16, "top_k": top_k, "max_T": T, "T_bucket": T}
    config = _grouped((bm, 16, 16, 4), {**meta, "T_bucket": 10 ** 6})  # the tile's BLOCK_M as given
    assert config["BLOCK_M"] == bm
    dtypes = {r: "fp32" for r in ("x", "w13", "w2", "out")}
    plan = Plan(launches(meta, dtypes, config)[:2])  # count, align
    assert len(plan.launches) == 2
    tensors = {name: torch.full((n,), -7, dtype=torch.int32) for name, (n, dt) in scratch(meta, T, config, "fp32")
               if dt == "i32"}
    tensors["topk_ids"] = ids.to(torch.int32).flatten().contiguous()
    run(plan, tensors, {"T": T, "S": 1})
    return tensors


# (T, top_k, E, BLOCK_M, how ids are drawn)
CASES = [(1, 2, 8, 16, "uniform"), (37, 2, 8, 16, "uniform"), (300, 3, 6, 32, "uniform"),
         (513, 1, 5, 16, "skewed"), (200, 4, 128, 16, "uniform"), (130, 8, 128, 64, "uniform"),
         (90, 2, 4, 16, "one")]


@pytest.mark.parametrize("T,top_k,E,bm,draw", CASES)
def test_align_matches_the_definition(T, top_k, E, bm, draw):
    g = torch.Generator().manual_seed(T * 7 + E)
    if draw == "one":
        ids = torch.full((T, top_k), E - 1)
        ids[:, 0] = 1
    elif draw == "skewed":  # most pairs on expert 0, some experts never chosen
        ids = torch.where(torch.rand(T, top_k, generator=g) < 0.8, 0, torch.randint(0, E // 2 + 1, (T, top_k),
                                                                                      generator=g))
    else:  # top-k ids are distinct per token, as the router gives them
        ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)])
    out = _align(ids, E, bm)
    num_blocks = -(-T // bm) * top_k + E
    want_sorted, want_expert, want_rows = _expected(ids, E, bm, num_blocks)
    assert torch.equal(out["block_expert"][:num_blocks], want_expert)
    assert torch.equal(out["block_rows"][:num_blocks], want_rows)
    filled = want_sorted >= 0
    assert torch.equal(out["sorted"][:num_blocks * bm][filled], want_sorted[filled])


def test_cases_cover_several_programs():
    assert sum(T > align_span(top_k) for T, top_k, *_ in CASES) >= 3


def test_a_long_prefill_spreads_over_programs():
    """8k tokens at top 8 of 128 experts (Qwen3-30B-A3B): both launches over 128 programs, not one."""
    from kernels.spec import eval_grid

    meta = {"E": 128, "D": 2048, "I": 768, "top_k": 8, "max_T": 8192, "T_bucket": 8192}
    config = _grouped((64, 64, 32, 4), meta)
    count, align = launches(meta, {r: "bf16" for r in ("x", "w13", "w2", "out")}, config)[:2]
    assert eval_grid(count.grid, {"T": 8192}) == eval_grid(align.grid, {"T": 8192}) == (128,)
