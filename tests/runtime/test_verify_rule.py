"""runtime.verify.compare: relative error bound plus argmax agreement at decisive positions."""

import torch

from runtime.verify import compare


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(6, 50, generator=torch.Generator().manual_seed(seed)) * 3


def test_exact_copy_passes_with_every_position_decisive():
    ref = _logits(0)
    res = compare(ref.clone(), ref, "fp32")
    assert res.passed and res.rel_err == 0 and res.decisive == 6


def test_flip_at_a_decisive_position_fails():
    ref = _logits(1)
    out = ref.clone()
    top = ref[2].argmax()
    gap = ref[2, top] - ref[2].topk(2).values[1]
    assert gap > 0.5, "the reference must be decisive at this position for the test to mean anything"
    out[2, top] -= gap + 0.1  # the winner drops below the runner-up: one logit off by about the gap
    res = compare(out, ref, "bf16")
    assert res.rel_err < 5e-2 and not res.passed and res.agreement < 1


def test_flip_at_a_near_tie_is_excused_but_error_still_bounded():
    ref = _logits(2)
    second, first = ref[3].topk(2).indices.flip(0)
    ref[3, second] = ref[3, first] - 1e-4  # a near-tie in the reference
    out = ref + 1e-2 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    out[3, second] = ref[3, first] + 1e-4  # the tie broken the other way
    res = compare(out, ref, "bf16")
    assert res.passed and res.decisive < 6
    assert not compare(ref * 1.5, ref, "bf16").passed  # a wrong scale fails on the error bound
