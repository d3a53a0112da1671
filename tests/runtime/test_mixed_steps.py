"""Mixed steps: the running sequences' decode tokens and prompt chunks in one step, up to the token budget.

The scheduler runs on test_scheduler's FakeModel (a next token that depends on every cached token, read back through
the block tables), with prompts arriving while others decode; the engine runs on the torch backend over the
tiny-llama artifact (and once on the interpret backend, for the device gather of a mixed step's fed rows). The
oracle is each prompt generated alone with mixed steps off, synchronously.
"""

import numpy as np
import pytest
import torch

from runtime.engine import load
from runtime.kv_cache import BlockAllocator
from runtime.sampling import SamplingParams
from runtime.scheduler import PENDING, Scheduler, Sequence
from tests.runtime.test_scheduler import BS, FakeModel
from tests.runtime.tiny_artifact import tiny_artifact


def drive(prompts, max_tokens, arrivals, budget, num_blocks=64, max_batch=4, mixed=True, prefix_cache=True):
    """Run the scheduler on FakeModel, prompt i added before step arrivals[i]; (generated tokens, batches)."""
    alloc = BlockAllocator(num_blocks)
    sched = Scheduler(alloc, BS, max_batch, budget, 64, prefix_cache=prefix_cache, mixed=mixed)
    model = FakeModel(num_blocks, 16)
    seqs = [Sequence(i, p, m, sched.new_table()) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    log, step = [], 0
    while True:
        for s, at in zip(seqs, arrivals):
            if at == step:
                sched.add(s)
        batch = sched.schedule()
        if batch is None:
            if all(at < step for at in arrivals):
                break
        else:
            assert batch.num_tokens <= budget and len(batch.seqs) <= max_batch
            log.append((batch.kind, [s.seq_id for s in batch.seqs], list(batch.counts)))
            for seq, _ in sched.update(batch, model.run(sched, batch)):
                if seq.num_generated == seq.max_tokens:
                    sched.finish(seq)
        step += 1
    assert alloc.num_free == num_blocks, "blocks leaked"
    return [s.generated for s in seqs], log


def alone(prompts, max_tokens):
    return [drive([p], [m], [0], budget=64, mixed=False)[0][0] for p, m in zip(prompts, max_tokens)]


SHORT = [[3, 1, 4], [1, 5, 9, 2], [6, 5]]
LONG = list(range(10, 60))  # 50 tokens: four steps of a budget of 16 beside three decode tokens


def test_a_long_prompt_is_prefilled_beside_the_decodes():
    prompts, max_tokens, arrivals = [*SHORT, LONG], [30, 30, 30, 3], [0, 0, 0, 2]
    out, log = drive(prompts, max_tokens, arrivals, budget=16)
    assert out == alone(prompts, max_tokens)
    chunks = [k for k, (_, ids, _) in enumerate(log) if 3 in ids and log[k][2][ids.index(3)] > 1]
    assert len(chunks) >= 4, log
    for k in chunks:  # every step of the long prompt's prefill: every short one's token first, then the chunk
        kind, ids, counts = log[k]
        assert kind == "prefill" and ids == [0, 1, 2, 3] and counts[:3] == [1, 1, 1], log[k]
        assert sum(counts) == 16 or k == chunks[-1], "the budget left after the decodes goes to the prompt"
    for i in range(3):  # no short sequence ever misses a step between its first and last token
        steps = [k for k, (_, ids, _) in enumerate(log) if i in ids]
        assert steps == list(range(steps[0], steps[-1] + 1)), (i, log)
    off, stalled = drive(prompts, max_tokens, arrivals, budget=16, mixed=False)
    assert off == out
    assert sum(kind == "prefill" and 0 not in ids for kind, ids, _ in stalled) >= 4, "the old way stalls the decodes"


def test_budget_below_max_batch_caps_the_running_sequences():
    prompts, max_tokens = [*SHORT, LONG, [7] * 9], [5, 6, 7, 3, 4]
    out, log = drive(prompts, max_tokens, [0, 0, 1, 1, 3], budget=2)
    assert out == alone(prompts, max_tokens)
    assert all(sum(counts) <= 2 for _, _, counts in log)
    assert any(kind == "prefill" and counts == [1, 1] for kind, _, counts in log), "decode + a 1-token chunk"


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_kv_pressure_preempts_and_the_partly_prefilled_prompt_yields_first(prefix_cache, monkeypatch):
    """13 blocks: four decoding sequences grow into the blocks a long prompt in the middle of its prefill holds.
    Were a running sequence preempted instead of that prompt, it would queue before it and wait for its blocks
    forever (the scheduler stalls)."""
    events = []
    partial, preempt = Scheduler._yield_partial, Scheduler.preempt
    monkeypatch.setattr(Scheduler, "_yield_partial", lambda self: partial(self) and not events.append("yield"))
    monkeypatch.setattr(Scheduler, "preempt", lambda self, seq: (events.append("preempt"), preempt(self, seq)))
    prompts = [*SHORT, [2, 7], list(range(100, 140)), [8] * 10]
    max_tokens = [20, 18, 16, 14, 2, 6]
    out, log = drive(prompts, max_tokens, [0, 0, 0, 0, 1, 2], budget=6, num_blocks=13, prefix_cache=prefix_cache)
    assert out == alone(prompts, max_tokens)
    assert "yield" in events and "preempt" in events, events
    assert any(kind == "prefill" and 1 in counts for kind, _, counts in log)


def test_deferred_mixed_step_carries_pending_decode_tokens_first():
    """With a step in flight the decode rows (their input PENDING) lead the step, one token each: what the feed
    maps onto the previous step's samples."""
    sched = Scheduler(BlockAllocator(16), BS, max_batch=4, max_num_tokens=8, max_seq_len=64)
    a, b = Sequence(0, [1, 2, 3], 5, sched.new_table()), Sequence(1, list(range(20, 32)), 2, sched.new_table())
    sched.add(a)
    sched.launched(sched.schedule())
    sched.add(b)
    batch = sched.schedule(defer=True)
    assert batch.kind == "prefill" and batch.seqs == [a, b] and batch.counts == [1, 7]
    assert [c.token_ids for c in batch.chunks()][0] == [PENDING]
    sched.launched(batch)
    assert b.token_ids[-1] != PENDING, "a chunk that is not the prompt's last samples nothing"


# -- the engine ---------------------------------------------------------------------------------------------------

LENGTHS = (5, 9, 3, 7, 60, 2, 40, 11)  # max_batch 4: the 60 and 40 arrive while others decode
MAX_TOKENS = (9, 12, 14, 6, 5, 10, 7, 8)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]
    prompts[6] = prompts[4][:32] + prompts[6][32:]  # two whole blocks of the 60's prefix: reused with the cache on
    return prompts


def _params():
    return [SamplingParams(max_tokens=m, temperature=0.9, top_k=40, seed=k, ignore_eos=True) if k % 2 else
            SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for k, m in enumerate(MAX_TOKENS)]


def _steps(engine):
    """Record each submitted step's kind and tokens per row (cu_seqlens_q differences) on ``engine``'s backend."""
    seen, submit = [], engine.backend.submit

    def traced(step, sampling, feed=None):
        seen.append((step.kind, np.diff(step.cu_seqlens_q).tolist(), 0 if feed is None else int((feed >= 0).sum())))
        return submit(step, sampling, feed)

    engine.backend.submit = traced
    return seen


def _generate(engine, prompts, params, async_decode):
    engine.async_decode = async_decode
    outs = engine.generate(prompts, params)
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


@pytest.fixture(scope="module")
def oracle():
    """Each prompt alone, mixed steps and the prefix cache off, synchronous."""
    engine = load(tiny_artifact(), backend="torch", mixed_steps=False, prefix_cache=False, async_decode=False)
    prompts, params = _prompts(engine.vocab_size), _params()
    return prompts, [_generate(engine, [p], [sp], False)[0] for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_engine_outputs_equal_each_prompt_alone(oracle, prefix_cache):
    prompts, expected = oracle
    for mixed in (True, False):
        engine = load(tiny_artifact(), backend="torch", mixed_steps=mixed, prefix_cache=prefix_cache,
                      max_num_batched_tokens=16)
        steps = _steps(engine)
        for async_decode in (False, True):
            del steps[:]
            assert _generate(engine, prompts, _params(), async_decode) == expected, (mixed, async_decode)
            assert all(sum(rows) <= 16 for _, rows, _ in steps)
            beside = [rows for kind, rows, _ in steps if kind == "prefill" and rows[0] == 1 and max(rows) > 1]
            assert (len(beside) >= 4) == mixed, steps  # the 60 and the 40 prefilled beside decodes
            if mixed and async_decode:
                assert any(kind == "prefill" and fed for kind, _, fed in steps), "a mixed step's decode rows fed"
        assert (engine.scheduler.reused_tokens > 0) == prefix_cache


def test_budget_is_validated():
    with pytest.raises(ValueError, match="--max-num-batched-tokens must be an integer from 1 to .* 128, not 0"):
        load(tiny_artifact(), backend="torch", max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="not 129"):
        load(tiny_artifact(), backend="torch", max_num_batched_tokens=129)


def test_interpret_backend_feeds_a_mixed_step():
    """The program's device gather for the leading decode row of a prefill-kind step, against the torch backend
    (greedy: its tokens are the interpreter's)."""
    kw = dict(max_blocks_total=8, max_num_batched_tokens=4, mixed_steps=True)
    interp, ref = load(tiny_artifact(), backend="interpret", **kw), load(tiny_artifact(), backend="torch", **kw)
    prompts = [[11, 12, 13], [20, 21, 22]]  # step 1: 3 + 1 tokens; step 2: 1 decode token + the other 2
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)]
    expected = _generate(ref, prompts, params, False)
    steps = _steps(interp)
    assert _generate(interp, prompts, params, True) == expected
    assert steps[1] == ("prefill", [1, 2], 1), steps
