"""Asynchronous decode on the GPU: the same tokens, texts and finish reasons as the synchronous path.

The cuda backend replays each decode step's graph with its input ids copied on the device from the previous
step's samples (device-to-device copies of Program.feed_runs), and reads the ids back through pinned memory one
step behind. A tiny fp32 Llama built for this GPU; eight prompts for max_batch 4, so sequences are admitted while
others decode and finish at different steps (max_tokens, stop token ids); greedy and seeded rows mixed; once with a
KV cache too small for all of them (waiting, preemption), once without CUDA graphs (the eager feed path).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

LENGTHS = (1, 3, 7, 15, 16, 17, 33, 50)
MAX_TOKENS = (9, 4, 24, 7, 30, 3, 11, 20)


@pytest.fixture(scope="module")
def artifact_path(tiny_llama_gpu):
    return tiny_llama_gpu


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def _params(stop_tokens=None) -> list:
    from runtime.sampling import SamplingParams

    stop_tokens = stop_tokens or [()] * len(MAX_TOKENS)
    return [SamplingParams(max_tokens=m, temperature=0 if k % 2 == 0 else 0.9, top_p=0.95, seed=100 + k,
                           ignore_eos=True, stop_token_ids=st)
            for k, (m, st) in enumerate(zip(MAX_TOKENS, stop_tokens))]


def _run(engine, prompts, params, async_decode: bool) -> list[tuple]:
    engine.async_decode = async_decode
    outs = engine.generate(prompts, params)
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


def _stops(outs: list[tuple]) -> list[tuple[int, ...]]:
    """Every other request stops at a token from the middle of its free-running output."""
    return [(ids[len(ids) // 2],) if k % 2 == 0 and len(ids) > 2 else () for k, (ids, _, _) in enumerate(outs)]


@pytest.mark.parametrize("backend_kw", [{}, {"cuda_graphs": False}, {"max_blocks_total": 8}],
                         ids=["graphs", "eager", "kv-pressure"])
def test_async_decode_equals_sync_on_cuda(artifact_path, backend_kw):
    import runtime

    # Under KV pressure without the prefix cache: the reruns of the same prompts must recompute (and preempt).
    engine = runtime.load(artifact_path, backend="cuda", prefix_cache="max_blocks_total" not in backend_kw,
                          **backend_kw)
    prompts = _prompts(engine.vocab_size, seed=11)
    before = engine.scheduler.preemptions  # a running sequence preempted or a partly prefilled prompt yielding
    free = _run(engine, prompts, _params(), async_decode=False)
    params = _params(_stops(free))
    sync = _run(engine, prompts, params, async_decode=False)
    assert sum(r == "stop" for _, _, r in sync) >= 3
    assert _run(engine, prompts, params, async_decode=True) == sync
    assert _run(engine, prompts, _params(), async_decode=True) == free
    if "max_blocks_total" in backend_kw:
        assert engine.scheduler.preemptions > before, "eight blocks for eight growing sequences should force preemption"


def test_async_greedy_on_cuda_equals_the_torch_backend(artifact_path):
    """An independent oracle for the device feed: the torch backend (on this GPU) computes each step's ids on
    the host."""
    import runtime
    from runtime.sampling import SamplingParams

    cuda = runtime.load(artifact_path, backend="cuda")
    ref = runtime.load(artifact_path, backend="torch", device="cuda", async_decode=False)
    prompts = _prompts(cuda.vocab_size, seed=12)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    assert [o.token_ids for o in cuda.generate(prompts, params)] == [o.token_ids for o in ref.generate(prompts, params)]


def test_stream_pieces_equal_and_an_abandoned_stream_frees_its_blocks(artifact_path):
    import runtime
    from runtime.sampling import SamplingParams

    engine = runtime.load(artifact_path, backend="cuda")
    prompt = "The capital of France is"
    sp = SamplingParams(max_tokens=40, temperature=0.8, seed=5, ignore_eos=True)
    engine.async_decode = False
    sync = list(engine.stream(prompt, sp))
    engine.async_decode = True
    assert list(engine.stream(prompt, sp)) == sync
    pieces = engine.stream(prompt, sp)
    next(pieces)
    pieces.close()
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
    assert list(engine.stream(prompt, sp)) == sync  # the step left in flight does not disturb the next request
