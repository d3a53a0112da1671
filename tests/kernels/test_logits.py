import pytest
import torch

from kernels.logits import SPEC, logits, reference

EPS = 1e-5
# (T, D, V, last_idx): one row, unsorted and repeated rows, the last row, D and V not multiples of any block.
CASES = [
    (1, 64, 100, [0]),
    (7, 123, 257, [6, 2, 2]),
    (20, 200, 1000, [19, 0, 5, 11, 3]),
]


def _inputs(T, D, V, last, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) * 3 + 0.2).to(dtype)
    norm_w = (1 + 0.2 * torch.randn(D, generator=g)).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    return x, norm_w, weight, torch.tensor(last, dtype=torch.int32)


def _poisoned(S, V):
    return torch.full((S, V), float("nan"), dtype=torch.float32)


# The output is fp32 and the sum is fp32 in both; only the order of additions differs.
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-4, 1e-4),
                                             (torch.bfloat16, 1e-4, 1e-4)])
@pytest.mark.parametrize("T,D,V,last", CASES)
def test_logits_matches_reference(T, D, V, last, dtype, atol, rtol):
    x, norm_w, weight, last_idx = _inputs(T, D, V, last, dtype, seed=T + D + V)
    out = logits(x, norm_w, weight, last_idx, eps=EPS, out=_poisoned(len(last), V))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x, norm_w, weight, last_idx, eps=EPS), atol=atol, rtol=rtol)


def test_logits_every_config():
    T, D, V, last = 9, 150, 300, [8, 1]
    x, norm_w, weight, last_idx = _inputs(T, D, V, last, torch.float16, seed=2)
    expected = reference(x, norm_w, weight, last_idx, eps=EPS)
    meta = {"D": D, "V": V, "eps": EPS, "max_T": T, "max_S": 2}
    for config in dict.fromkeys([*SPEC.configs(meta), SPEC.default(meta)]):
        out = logits(x, norm_w, weight, last_idx, eps=EPS, out=_poisoned(2, V), config=config)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=lambda m, c=config: f"{c}: {m}")


def test_logits_reference_is_norm_then_lm_head():
    # The reference against the textbook two-step form, so both are not wrong the same way.
    x, norm_w, weight, last_idx = _inputs(5, 40, 60, [4, 0], torch.float32, seed=9)
    rows = x[[4, 0]]
    normed = rows / torch.sqrt((rows * rows).sum(-1, keepdim=True) / 40 + EPS) * norm_w
    torch.testing.assert_close(reference(x, norm_w, weight, last_idx, eps=EPS), normed @ weight.T)


def test_logits_row_stride():
    x_wide, norm_w, weight, last_idx = _inputs(6, 180, 70, [5, 3], torch.float32, seed=4)
    x = x_wide[:, :96]
    norm_w, weight = norm_w[:96].contiguous(), weight[:, :96].contiguous()
    out = logits(x, norm_w, weight, last_idx, eps=EPS, out=_poisoned(2, 70))
    torch.testing.assert_close(out, reference(x, norm_w, weight, last_idx, eps=EPS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_logits_cross_compiles(dtype):
    from tests.kernels.aot_util import assert_cross_compiles
    from tests.kernels.test_linear import assert_fits_shared_memory

    meta = {"D": 2048, "V": 32000, "eps": 1e-5, "max_T": 2048, "max_S": 32}
    dtypes = {"x": dtype, "norm_w": dtype, "weight": dtype, "last_idx": "i32", "out": "fp32"}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3
    assert_fits_shared_memory(SPEC, meta, dtypes)
