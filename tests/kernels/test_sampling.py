import pytest
import torch

from kernels.sampling import filtered_probs, reference, sampling
from kernels.spec import Config

POISON = -7  # an int output cannot hold NaN; any unwritten row keeps this impossible id
SMALL = Config.make(num_warps=4, num_stages=1, BLOCK_V=32)  # several chunks per row even at small V


def _params(S: int, g: torch.Generator, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    full = lambda v, dt: torch.full((S,), v, dtype=dt)
    seeds = torch.randint(0, 1 << 62, (S,), generator=g)
    offsets = torch.randint(0, 1 << 40, (S,), generator=g)
    return (full(temperature, torch.float32), full(top_k, torch.int32), full(top_p, torch.float32),
            full(min_p, torch.float32), seeds, offsets)


def _run(logits, params, config=None):
    out = torch.full((logits.shape[0],), POISON, dtype=torch.int32)
    return sampling(logits, *params, out=out, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,V,config", [(1, 7, None), (5, 123, SMALL), (9, 1000, None), (3, 1000, SMALL)])
def test_greedy_equals_argmax_with_ties(S, V, config, dtype):
    g = torch.Generator().manual_seed(S * 100 + V)
    logits = torch.randn(S, V, generator=g).to(dtype)
    # Ties of the maximum, within a chunk and across chunks, must resolve to the lowest index as torch does.
    for r in range(0, S, 2):
        cols = torch.randperm(V, generator=g)[: min(3, V)]
        logits[r, cols] = logits[r].max() + 1
    out = _run(logits, _params(S, g, temperature=0.0), config)
    assert torch.equal(out, logits.float().argmax(dim=-1).to(torch.int32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter: −inf − −inf
def test_greedy_handles_infinite_rows():
    logits = torch.randn(4, 50)
    logits[0] = -float("inf")  # a fully masked row still yields a valid id (torch.argmax gives 0)
    logits[1, :40] = -float("inf")
    g = torch.Generator().manual_seed(3)
    out = _run(logits, _params(4, g, temperature=0.0), SMALL)
    assert torch.equal(out, logits.argmax(dim=-1).to(torch.int32))
    out = _run(logits, _params(4, g, temperature=1.0), SMALL)
    assert out[0] == 0 and out[1] >= 40 and ((out >= 0) & (out < 50)).all()


FILTERS = [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_p=0.6),
    dict(temperature=1.3, min_p=0.2),
    dict(temperature=0.5, top_k=20, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("dtype,config", [(torch.float32, SMALL), (torch.float16, None)])
@pytest.mark.parametrize("filters", FILTERS)
def test_samples_lie_in_reference_kept_set(filters, dtype, config):
    S, V = 24, 123
    g = torch.Generator().manual_seed(len(str(filters)))
    logits = (2.5 * torch.randn(S, V, generator=g)).to(dtype)
    params = _params(S, g, **filters)
    out = _run(logits, params, config)
    assert ((out >= 0) & (out < V)).all()
    probs = filtered_probs(logits, *params[:4])
    assert (probs.gather(1, out.long()[:, None]) > 0).all(), "a token outside the kept set was drawn"


def test_mixed_rows_in_one_batch():
    S, V = 12, 90
    g = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(S, V, generator=g)
    temperature = torch.tensor([0.0, 1.0, 0.6, 0.0, 1.4, 0.9] * 2)
    top_k = torch.tensor([0, 7, 0, 3, 0, 2] * 2, dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.3, 0.95, 1.0] * 2)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.1, 0.0] * 2)
    params = (temperature, top_k, top_p, min_p, *_params(S, g)[4:])
    out = _run(logits, params, SMALL)
    greedy = temperature == 0
    assert torch.equal(out[greedy], logits[greedy].argmax(dim=-1).to(torch.int32))
    assert (filtered_probs(logits, *params[:4]).gather(1, out.long()[:, None]) > 0).all()


def _designed_row(top: dict[int, float], V: int = 40) -> list[float]:
    row = [-3.0 + 0.05 * i for i in range(V)]  # a long tail of small, distinct probabilities
    for col, value in top.items():
        row[col] = value
    return row


# Each kept set is small with every member at p ≥ 0.11, so 48 draws hit all of them (a miss has odds
# below 0.4%), while a tail token or a wrongly excluded neighbour would show up: drawn set == kept set.
KEPT_CASES = [
    (_designed_row({3: 2.0, 17: 1.5, 33: 1.5, 20: 1.0}), dict(top_k=2), [3, 17, 33]),  # tie at the k-th kept
    (_designed_row({5: 2.0, 11: 1.8, 25: 1.6, 30: 1.4, 39: 1.2}), dict(top_k=4, top_p=0.7), [5, 11, 25]),  # p of k-mass
    (_designed_row({0: 2.0, 9: 1.7, 31: 1.5, 14: 0.9}), dict(min_p=0.5), [0, 9, 31]),
    (_designed_row({2: 1.0, 19: 0.8, 27: 0.5}), dict(temperature=0.3, top_p=0.9), [2, 19, 27]),
]


@pytest.mark.parametrize("row,filters,kept", KEPT_CASES)
def test_drawn_set_equals_kept_set(row, filters, kept):
    S = 48
    g = torch.Generator().manual_seed(sum(kept))
    logits = torch.tensor([row]).expand(S, len(row)).contiguous()
    params = _params(S, g, **filters)
    assert (filtered_probs(logits[:1], *[p[:1] for p in params[:4]])[0] > 0).nonzero().flatten().tolist() == kept
    out = _run(logits, params, SMALL)
    assert sorted(set(out.tolist())) == kept


def test_top_k_one_is_greedy():
    S, V = 16, 200
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(S, V, generator=g)
    out = _run(logits, _params(S, g, temperature=1.5, top_k=1, top_p=0.9), SMALL)
    assert torch.equal(out, logits.argmax(dim=-1).to(torch.int32))


def _total_variation(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    hist = torch.bincount(tokens.long(), minlength=probs.numel()).float() / tokens.numel()
    return 0.5 * (hist - probs).abs().sum().item()


# Sampling noise in total variation at 400 draws is ≈ 0.05 here. Each case names what a kernel that ignored
# its temperature or filter would draw, ≥ 0.18 away from the right distribution, so 0.1 separates the two.
DIST_CASES = [
    ([0.1, 0.7, -0.4, 1.2, 0.0, 0.9, -1.0, 0.4], dict(temperature=0.5), dict(temperature=1.0)),
    ([3.0, 2.6, 2.2, 1.5, 1.4, 1.3, 1.2, 1.0], dict(temperature=1.0, min_p=0.5), dict(temperature=1.0)),
]


def _probs(row: list[float], **filters) -> torch.Tensor:
    (temperature, top_k, top_p, min_p, _, _) = _params(1, torch.Generator(), **filters)
    return filtered_probs(torch.tensor([row]), temperature, top_k, top_p, min_p)[0]


def test_empirical_distribution_matches_filtered_probs():
    n, V = 400, 8
    g = torch.Generator().manual_seed(11)
    logits = torch.cat([torch.tensor(row).expand(n, V) for row, _, _ in DIST_CASES]).contiguous()
    params = [torch.cat(parts) for parts in zip(*[_params(n, g, **f) for _, f, _ in DIST_CASES])]
    out = _run(logits, params)
    for i, (row, filters, broken) in enumerate(DIST_CASES):
        target = _probs(row, **filters)
        assert 0.5 * (target - _probs(row, **broken)).abs().sum() > 0.18
        tv = _total_variation(out[i * n:(i + 1) * n], target)
        assert tv < 0.1, f"case {i}: total variation {tv:.3f} from filtered_probs"


def test_same_seed_and_offset_reproduce_and_offsets_vary():
    S, V = 32, 40
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, V, generator=g).expand(S, V).contiguous() * 0.3  # flat: many likely tokens
    params = list(_params(S, g))
    params[4] = torch.full((S,), 1234, dtype=torch.int64)
    params[5] = torch.arange(S, dtype=torch.int64)
    first = _run(logits, params, SMALL)
    assert torch.equal(first, _run(logits, params, SMALL))
    assert first.unique().numel() > 8, "different offsets must give different draws"
    params[5] = torch.full((S,), 9, dtype=torch.int64)
    same = _run(logits, params, SMALL)
    assert (same == same[0]).all(), "one seed and one offset is one draw, whatever the row"
    params[4] = torch.arange(S, dtype=torch.int64) * 7919
    assert _run(logits, params, SMALL).unique().numel() > 8, "different seeds must give different draws"


def test_filtered_probs_semantics():
    # p = [0.5, 0.25, 0.125, 0.125] exactly: hand-checked kept sets.
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    ones = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        probs = filtered_probs(logits, ones(1.0), ones(top_k, torch.int32), ones(top_p), ones(min_p))
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
        return (probs[0] > 0).nonzero().flatten().tolist()

    assert kept() == [0, 1, 2, 3]
    assert kept(top_k=3) == [0, 1, 2, 3]  # the tie at the 3rd value keeps both
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.6) == [0, 1] and kept(top_p=0.5) == [0] and kept(top_p=0.8) == [0, 1, 2, 3]
    assert kept(top_k=2, top_p=0.7) == [0, 1] and kept(top_k=2, top_p=0.6) == [0]  # top_p of the k-kept mass
    assert kept(min_p=0.3) == [0, 1] and kept(min_p=0.25) == [0, 1, 2, 3]
    one_hot = filtered_probs(logits, ones(0.0), ones(0, torch.int32), ones(1.0), ones(0.0))
    assert one_hot.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_reference_draws_from_kept_set():
    S, V = 32, 50
    g = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(S, V, generator=g)
    params = _params(S, g, temperature=0.8, top_k=10, top_p=0.7)
    out = reference(logits, *params)
    assert out.dtype == torch.int32
    assert (filtered_probs(logits, *params[:4]).gather(1, out.long()[:, None]) > 0).all()
    assert torch.equal(out, reference(logits, *params))
    greedy = _params(S, g, temperature=0.0)
    assert torch.equal(reference(logits, *greedy), logits.argmax(-1).to(torch.int32))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_sampling_cross_compiles(dtype):
    from kernels.sampling import SPEC
    from tests.kernels.aot_util import assert_cross_compiles

    dtypes = {"logits": dtype, "temperature": "fp32", "top_k": "i32", "top_p": "fp32", "min_p": "fp32",
              "seeds": "i64", "offsets": "i64", "out": "i32"}
    assert assert_cross_compiles(SPEC, {"V": 151936, "max_T": 256, "max_S": 32}, dtypes) >= 3
