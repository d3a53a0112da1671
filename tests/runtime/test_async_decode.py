"""Asynchronous decode (the engine enqueues step N+1 before reading step N's ids) against the synchronous path.

On the CPU backends a step runs to completion inside ``submit``, but the engine's bookkeeping is the one the
GPU runs: PENDING placeholders, the feed that maps each decode row to the previous step's sampled row, stops
checked one step behind, the extra token of a sequence that stopped dropped. The torch backend applies the
feed on the host and refuses a placeholder nobody fed; the interpret backend runs the program's device gather.
Every comparison is of whole outputs (token ids, text, finish reason) on one engine, switched between paths.
"""

import pytest
import torch

from runtime.engine import Engine, load
from runtime.sampling import SamplingParams
from tests.runtime.step_trace import StepTrace
from tests.runtime.tiny_artifact import tiny_artifact

LENGTHS = (1, 3, 7, 15, 16, 17, 33, 50)  # eight prompts for max_batch 4: admissions while others decode
MAX_TOKENS = (9, 4, 12, 7, 20, 3, 11, 20)


@pytest.fixture(scope="module")
def engine():
    return load(tiny_artifact(), backend="torch")


@pytest.fixture(scope="module")
def small_engine():
    """Eight KV blocks for eight growing sequences: some wait, some are preempted."""
    return load(tiny_artifact(), backend="torch", max_blocks_total=8)


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def _outputs(engine: Engine, prompts, params, async_decode: bool) -> list[tuple]:
    engine.async_decode = async_decode
    try:
        outs = engine.generate(prompts, params)
    finally:
        engine.async_decode = True
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


def _stop_tokens(outs: list[tuple], every: int = 2) -> list[tuple[int, ...]]:
    """For every other request, a stop token from the middle of its free-running output: stops at varied steps."""
    return [(ids[len(ids) // 2],) if k % every == 0 and len(ids) > 2 else () for k, (ids, _, _) in enumerate(outs)]


def test_greedy_async_equals_sync_with_stops_at_different_steps(engine):
    prompts = _prompts(engine.vocab_size, seed=1)
    free = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    base = _outputs(engine, prompts, free, async_decode=False)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, stop_token_ids=st)
              for m, st in zip(MAX_TOKENS, _stop_tokens(base))]
    sync = _outputs(engine, prompts, params, async_decode=False)
    assert sum(r == "stop" for _, _, r in sync) >= 3 and sync != base
    with StepTrace(engine) as trace:
        got = _outputs(engine, prompts, params, async_decode=True)
    assert got == sync
    assert all(-1 not in ids for ids, _, _ in got)
    # One step behind: every read but the last comes after the next step was submitted.
    assert sorted(trace.reads()) == trace.submits()
    # only a drain (the scheduler deferring) breaks the overlap
    assert trace.ahead() >= len(trace.submits()) - 3, trace.events
    assert trace.fed > 20  # decode rows took their ids from the previous step's samples


def test_seeded_sampling_and_stop_strings_async_equal_sync(engine):
    prompts = ["The capital of France is", "Once upon a time", "def f(x):", "1, 2, 3,", "Hello", "A B C"]
    params = [SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, top_k=40, seed=7 + k) for k in range(6)]
    base = _outputs(engine, prompts, params, async_decode=False)
    stops = []
    for _, text, _ in base:
        clean = [i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2]]
        stops.append((text[clean[len(clean) // 2]:][:2],) if clean else ())
    params = [SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, top_k=40, seed=7 + k, stop=s)
              for k, s in enumerate(stops)]
    sync = _outputs(engine, prompts, params, async_decode=False)
    assert sum(r == "stop" for _, _, r in sync) >= 2
    assert _outputs(engine, prompts, params, async_decode=True) == sync


def test_kv_pressure_and_preemption_async_equal_sync(engine, small_engine):
    prompts = _prompts(small_engine.vocab_size, seed=2)
    params = [SamplingParams(max_tokens=20, temperature=0.8, seed=k, ignore_eos=True) if k % 2 else
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True) for k in range(len(prompts))]
    base = _outputs(engine, prompts, params, async_decode=False)  # the same tokens as with few blocks, sooner
    params = [SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed, ignore_eos=True,
                             stop_token_ids=st) for p, st in zip(params, _stop_tokens(base, every=4))]
    sync = _outputs(small_engine, prompts, params, async_decode=False)
    preempted = []
    original = small_engine.scheduler.preempt
    small_engine.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), original(seq))
    try:
        got = _outputs(small_engine, prompts, params, async_decode=True)
    finally:
        del small_engine.scheduler.preempt
    assert got == sync and preempted


def test_streaming_is_one_step_behind_but_the_same(engine):
    prompt = "The capital of France is"
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.async_decode = False
    sync = list(engine.stream(prompt, sp))
    engine.async_decode = True
    assert list(engine.stream(prompt, sp)) == sync
    pieces = engine.stream(prompt, sp)  # a consumer that leaves early, with a step in flight
    next(pieces)
    next(pieces)
    pieces.close()
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks


def test_repetition_penalty_runs_synchronously_and_matches(engine):
    prompts = _prompts(engine.vocab_size, seed=4)[:5]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.3)] + \
        [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 4
    sync = _outputs(engine, prompts, params, async_decode=False)
    with StepTrace(engine) as trace:
        assert _outputs(engine, prompts, params, async_decode=True) == sync
    # Nothing fed, nothing ahead: each submitted step's ids are read before the next step is submitted.
    assert trace.fed == 0 and all(a[0] != b[0] for a, b in zip(trace.events, trace.events[1:]))


def test_max_tokens_one_and_long_requests_mixed(engine):
    """A sequence whose only token comes from its prefill is never scheduled again; max_tokens None fills up."""
    prompts = [[5] * 3, [7] * 120, [9] * 10]
    params = [SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)]
    sync = _outputs(engine, prompts, params, async_decode=False)
    assert [len(ids) for ids, _, _ in sync] == [1, 8, 5]
    assert _outputs(engine, prompts, params, async_decode=True) == sync


def test_interpret_backend_async_equals_sync(engine):
    """The program's device gather (feed_ids) on the artifact's own kernels; few tokens, the interpreter is slow."""
    interp = load(tiny_artifact(), backend="interpret", max_blocks_total=16)
    prompts = [[11, 12, 13], [20] * 5, [30, 31]]
    free = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    stop = engine.generate([prompts[0]], free)[0].token_ids[1]  # greedy: the torch backend's tokens are the same
    params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, stop_token_ids=(stop,)),
              SamplingParams(max_tokens=2, temperature=0.9, seed=3, ignore_eos=True), free]
    sync = _outputs(interp, prompts, params, async_decode=False)
    assert sync[0][2] == "stop" and len(sync[0][0]) <= 2
    with StepTrace(interp) as trace:
        assert _outputs(interp, prompts, params, async_decode=True) == sync
    assert trace.fed >= 3
