"""benchmarks/perplexity.py's scoring against torch's cross-entropy, and its windows (no model: the maths only)."""

import math

import torch

from benchmarks.perplexity import nll, windows


def test_nll_is_the_cross_entropy_of_each_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=g) * 3
    ids = torch.randint(0, 50, (9,), generator=g).tolist()
    total, count = nll(logits, ids)
    ref = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum")
    assert count == 8 and math.isclose(total, float(ref), rel_tol=1e-12)
    # A model that puts all its mass on the right next token scores perplexity 1.
    sure = torch.full((9, 50), -1e9)
    sure[torch.arange(8), torch.tensor(ids[1:])] = 0.0
    assert math.exp(nll(sure, ids)[0] / 8) == 1.0


def test_windows_cover_the_first_tokens_without_overlap():
    ids = list(range(23))
    chunks = windows(ids, 20, 8)
    assert chunks == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    # A last window of one token has nothing to score: it is left out.
    assert windows(list(range(17)), 17, 8) == [list(range(0, 8)), list(range(8, 16))]
