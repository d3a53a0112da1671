"""Prefix caching and mixed steps on the cuda backend: the same tokens as without them, and against the torch
backend on this GPU (an independent oracle: it computes each step's ids on the host, one step at a time).

A tiny fp32 Llama built for this GPU, max_batch 4 and a small step budget, so prompts wait, are prefilled in
chunks beside running decodes (mixed steps), and later prompts share the KV blocks of earlier ones (a common
prefix of three blocks). Greedy and seeded rows mixed; asynchronous decode on (the default) and off.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

SHARED = 48  # three 16-token blocks every prompt starts with
TAILS = (1, 5, 17, 30, 2, 40, 9, 23)
MAX_TOKENS = (12, 4, 20, 7, 16, 3, 11, 9)


@pytest.fixture(scope="module")
def artifact_path(tiny_llama_gpu):
    return tiny_llama_gpu


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(21)
    shared = torch.randint(3, vocab, (SHARED,), generator=gen).tolist()
    return [shared + torch.randint(3, vocab, (n,), generator=gen).tolist() for n in TAILS]


def _params() -> list:
    from runtime.sampling import SamplingParams

    return [SamplingParams(max_tokens=m, temperature=0 if k % 2 == 0 else 0.9, top_p=0.95, seed=50 + k,
                           ignore_eos=True) for k, m in enumerate(MAX_TOKENS)]


def _outputs(engine, prompts) -> list[tuple]:
    outs = engine.generate(prompts, _params())
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


@pytest.mark.parametrize("async_decode", [True, False], ids=["async", "sync"])
def test_prefix_cache_and_mixed_steps_keep_the_tokens_on_cuda(artifact_path, async_decode):
    import runtime

    plain = runtime.load(artifact_path, backend="cuda", prefix_cache=False, mixed_steps=False,
                         async_decode=async_decode)
    prompts = _prompts(plain.vocab_size)
    want = _outputs(plain, prompts)
    del plain
    engine = runtime.load(artifact_path, backend="cuda", prefix_cache=True, mixed_steps=True,
                          max_num_batched_tokens=24, async_decode=async_decode)
    steps = []
    submit = engine.backend.submit

    def record(step, *args, **kw):
        # mixed: a prefill-kind step led by a decode row (one token continuing a sequence) beside a longer chunk
        mixed = step.kind == "prefill" and step.T > step.S and step.single_token_rows(1) and int(step.positions[0]) > 0
        steps.append((step.T, mixed))
        return submit(step, *args, **kw)

    engine.backend.submit = record
    try:
        assert _outputs(engine, prompts) == want
    finally:
        del engine.backend.submit
    assert engine.scheduler.reused_tokens >= SHARED, "later prompts should share the first one's blocks"
    assert any(mixed for _, mixed in steps), "expected steps that prefill beside running decodes"
    assert all(T <= 24 for T, _ in steps)


def test_greedy_with_both_on_equals_the_torch_backend(artifact_path):
    import runtime
    from runtime.sampling import SamplingParams

    cuda = runtime.load(artifact_path, backend="cuda", prefix_cache=True, mixed_steps=True, max_num_batched_tokens=24)
    ref = runtime.load(artifact_path, backend="torch", device="cuda", async_decode=False, prefix_cache=False)
    prompts = _prompts(cuda.vocab_size)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    assert [o.token_ids for o in cuda.generate(prompts, params)] == [o.token_ids for o in ref.generate(prompts, params)]
