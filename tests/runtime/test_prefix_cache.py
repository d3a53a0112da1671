"""Prefix caching: the allocator's reference counts, keys and LRU eviction; the scheduler's reuse; and the engine on
the torch backend over the tiny-llama artifact (block size 16), whose outputs must be those of the cache off.

Every engine test also checks that the cache really was used (the scheduler's ``reused_tokens`` and the number of
tokens the prefill steps carried), so none can pass with caching silently off.
"""

from dataclasses import replace

import pytest
import torch

from runtime.engine import Engine, load
from runtime.kv_cache import BlockAllocator, BlockTable, prefix_key
from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler, Sequence
from tests.runtime.test_scheduler import BS, generate
from tests.runtime.tiny_artifact import tiny_artifact

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.9, top_k=50, seed=7, ignore_eos=True)


# -- the allocator and the block table -------------------------------------------------------------

def test_a_shared_block_is_freed_by_its_last_holder_and_stays_cached():
    a = BlockAllocator(4)
    (b,) = a.allocate(1)
    a.register(b, b"k")
    a.share(b)
    assert a.num_used == 1 and a.num_free == 3
    a.free([b])
    assert a.num_used == 1 and a.lookup(b"k") == b, "still held by the second table"
    a.free([b])
    assert a.num_used == 0 and a.num_free == 4 and a.num_cached == 1 and a.lookup(b"k") == b
    a.share(b)  # taken back out of the cache
    assert a.num_used == 1 and a.num_cached == 0 and a.num_free == 3
    a.free([b])
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free([b])


def test_unkeyed_blocks_go_first_then_the_least_recently_released_cached_one():
    a = BlockAllocator(4)
    blocks = a.allocate(4)
    for i, b in enumerate(blocks[:3]):
        a.register(b, bytes([i]))
    a.free(blocks)  # 0, 1, 2 cached in that order; 3 free
    assert a.num_free == 4 and a.num_cached == 3
    assert a.allocate(1) == [blocks[3]]
    assert a.allocate(2) == blocks[:2] and a.lookup(bytes([0])) is None and a.lookup(bytes([1])) is None
    assert a.lookup(bytes([2])) == blocks[2]
    with pytest.raises(RuntimeError, match="only a keyed block"):
        a.share(blocks[0])  # evicted and handed out again: its key is gone


def test_a_key_stays_with_the_first_block_that_had_it():
    a = BlockAllocator(3)
    x, y = a.allocate(2)
    a.register(x, b"k")
    a.register(y, b"k")  # the same prefix, computed side by side
    assert a.lookup(b"k") == x
    a.free([y])
    assert a.num_cached == 0, "the duplicate is plain free"
    with pytest.raises(RuntimeError, match="not in use"):
        a.register(y, b"other")


def test_keys_chain_so_that_a_block_matches_only_after_the_same_prefix():
    assert prefix_key(b"", [1, 2]) != prefix_key(prefix_key(b"", [0, 0]), [1, 2])
    a = BlockAllocator(8)
    t = BlockTable(a, block_size=4)
    tokens = list(range(10))
    t.ensure(10)
    t.publish(tokens, 9)  # two full blocks written
    assert len(t.keys) == 2 and a.lookup(prefix_key(b"", tokens[:4])) == t.blocks[0]
    other = BlockTable(a, block_size=4)
    assert other.reuse([9, 9, 9, 9] + tokens[4:8], 8) == 0, "block 1's tokens behind another block 0"
    same = BlockTable(a, block_size=4)
    assert same.reuse(tokens[:4] + [7, 7, 7, 7, 7], 8) == 4 and same.blocks == t.blocks[:1]
    assert a.num_used == 3
    t.release()
    same.release()
    assert a.num_used == 0 and a.num_cached == 2


def test_a_released_prefix_is_evicted_tail_first():
    """A block is only found through the keys of every block before it: evicting the head would strand the rest."""
    a = BlockAllocator(4)
    t = BlockTable(a, block_size=2)
    t.ensure(6)
    t.publish([1, 2, 3, 4, 5, 6], 6)
    blocks, keys = list(t.blocks), list(t.keys)
    t.release()
    assert a.num_cached == 3 and a.num_free == 4
    assert a.allocate(2) == [3, blocks[2]]  # the never-keyed block first, then the prefix's last block
    assert [a.lookup(k) for k in keys] == [blocks[0], blocks[1], None]
    again = BlockTable(a, block_size=2)
    assert again.reuse([1, 2, 3, 4, 5, 6], 5) == 4 and again.blocks == blocks[:2]


# -- the scheduler over the fake paged model of test_scheduler -------------------------------------

def _shared_prompts(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    bases = [torch.randint(1, 1000, (24,), generator=gen).tolist() for _ in range(3)]
    prompts, max_tokens = [], []
    for i in range(n):
        cut = int(torch.randint(1, 25, (1,), generator=gen))
        tail = torch.randint(1, 1000, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen).tolist()
        prompts.append(bases[i % 3][:cut] + tail)
        max_tokens.append(int(torch.randint(1, 12, (1,), generator=gen)))
    return prompts, max_tokens


@pytest.mark.parametrize("num_blocks", [64, 12], ids=["roomy", "evicting-and-preempting"])
def test_shared_prefixes_change_no_output_and_save_prefill(num_blocks):
    prompts, max_tokens = _shared_prompts(24, seed=num_blocks)
    off, off_model = generate(prompts, max_tokens, num_blocks, prefix_cache=False)
    on, on_model = generate(prompts, max_tokens, num_blocks)
    assert [s.generated for s in on] == [s.generated for s in off]
    prefilled = [sum(T for kind, T, _ in m.steps if kind == "prefill") for m in (on_model, off_model)]
    assert prefilled[0] < prefilled[1], f"no prefill saved: {prefilled}"
    if num_blocks == 12:
        assert sum(s.num_preemptions for s in on) > 0, "the small cache should force preemption"


def test_a_preempted_sequence_takes_back_its_own_blocks():
    alloc = BlockAllocator(3)
    sched = Scheduler(alloc, BS, max_batch=4, max_num_tokens=64, max_seq_len=16)
    old, new = Sequence(0, [1] * 4, 4, sched.new_table()), Sequence(1, [2] * 4, 4, sched.new_table())
    sched.add(old)
    sched.add(new)
    sched.update(sched.schedule(), [3, 4])
    assert sched.schedule().seqs == [old] and new.num_preemptions == 1
    assert alloc.num_cached == 1, "new's full prompt block stays keyed"
    while old.num_generated < old.max_tokens:
        sched.update(sched.schedule(), [3])
    sched.finish(old)
    batch = sched.schedule()
    assert batch.kind == "prefill" and batch.seqs == [new] and batch.starts == [4] and batch.counts == [1]
    assert sched.reused_tokens == 4


def test_a_sliding_window_turns_the_prefix_cache_off():
    assert not Scheduler(BlockAllocator(4), BS, 2, 8, 16, window=5).prefix_cache
    assert Scheduler(BlockAllocator(4), BS, 2, 8, 16).prefix_cache


# -- the engine --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def on():
    return load(tiny_artifact(), backend="torch")


@pytest.fixture(scope="module")
def off():
    return load(tiny_artifact(), backend="torch", prefix_cache=False)


def _rand(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Prefills:
    """Counts the tokens of the prefill steps ``engine``'s backend runs."""

    def __init__(self, engine: Engine):
        self.engine, self.tokens = engine, 0

    def __enter__(self):
        submit = self.engine.backend.submit

        def counted(step, sampling, feed=None):
            self.tokens += step.T if step.kind == "prefill" else 0
            return submit(step, sampling, feed)

        self.engine.backend.submit = counted
        return self

    def __exit__(self, *exc):
        del self.engine.backend.submit


def _run(engine: Engine, prompts, params, async_decode: bool) -> tuple[list[tuple], int, int]:
    """Outputs of one generate() call, the tokens it took from the cache, and the tokens its prefills ran."""
    engine.async_decode = async_decode
    before = engine.scheduler.reused_tokens
    try:
        with _Prefills(engine) as prefills:
            outs = engine.generate(prompts, params)
    finally:
        engine.async_decode = True
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
    assert engine.allocator.num_used == 0
    return [(o.token_ids, o.text, o.finish_reason) for o in outs], engine.scheduler.reused_tokens - before, \
        prefills.tokens


@pytest.mark.parametrize("async_decode", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_requests_after_a_shared_prefix_equal_the_cache_off(on, off, params, async_decode):
    base = _rand(40, seed=2 * (params.temperature > 0) + async_decode)  # unseen by the other cases' requests
    first = replace(params, max_tokens=10)  # 50 tokens, the KV of 49 written: three full blocks, one with answer
    later = [(base[:32] + _rand(7, 1), 32),  # two whole blocks shared
             (base[:20] + _rand(9, 2), 16),  # one whole block and part of the next
             (base[:32], 16),  # the whole prompt is cached: its last block is recomputed, to sample from
             (base[:33], 32)]  # one token past two cached blocks
    want, _, _ = _run(off, [base], first, async_decode)
    answer, saved, _ = _run(on, [base], first, async_decode)
    assert answer == want and saved == 0
    for p, reused in later:
        want, _, _ = _run(off, [p], params, async_decode)
        got, saved, prefilled = _run(on, [p], params, async_decode)
        assert got == want and (saved, prefilled) == (reused, len(p) - reused), p
    # A second turn, the first prompt and its answer: the block holding the answer's first tokens was keyed too
    # (with async decode once their placeholders were filled in), so 48 of its 50 tokens are reused.
    turn = base + answer[0][0]
    want, _, _ = _run(off, [turn], params, async_decode)
    got, saved, prefilled = _run(on, [turn], params, async_decode)
    assert got == want and (saved, prefilled) == (48, 2)


@pytest.fixture(scope="module")
def small_on():
    """Eight KV blocks of 16 tokens: the cache evicts, and four running sequences that grow are preempted."""
    return load(tiny_artifact(), backend="torch", max_blocks_total=8)


@pytest.fixture(scope="module")
def small_off():
    return load(tiny_artifact(), backend="torch", max_blocks_total=8, prefix_cache=False)


@pytest.mark.parametrize("async_decode", [True, False], ids=["async", "sync"])
def test_a_shared_system_prompt_under_preemption_equals_the_cache_off(small_on, small_off, async_decode):
    system = _rand(20, seed=10 + async_decode)  # one whole block and part of the next
    prompts = [system + _rand(n, seed=20 + n) for n in (3, 9, 14, 25, 5, 18, 12, 7)]
    params = replace(GREEDY, max_tokens=12)
    preempted = []
    original = small_on.scheduler.preempt
    small_on.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), original(seq))
    try:
        got, saved, _ = _run(small_on, prompts, params, async_decode)
    finally:
        del small_on.scheduler.preempt
    want, _, _ = _run(small_off, prompts, params, async_decode)
    assert got == want
    assert preempted and saved >= 16 * 4, (preempted, saved)


def test_a_prefix_evicted_under_memory_pressure_goes_tail_first(small_on, small_off):
    prompts = [_rand(40, seed=30 + i) for i in range(4)]  # three blocks each at 48 tokens, two of them keyed
    params = replace(GREEDY, max_tokens=8)
    saved = []
    for p in prompts + prompts[:1]:
        got, s, _ = _run(small_on, [p], params, False)
        want, _, _ = _run(small_off, [p], params, False)
        assert got == want
        saved.append(s)
    # The fourth request took the last free block and then the oldest cached one: the first prompt's second block
    # (released before its first). Its first block is still there for the repeat.
    assert saved == [0, 0, 0, 0, 16]


def test_an_abandoned_stream_leaves_its_prefix_to_reuse(on, off):
    base = _rand(40, seed=40)
    pieces = on.stream(base, replace(GREEDY, max_tokens=20))
    next(pieces)
    pieces.close()  # the consumer stops after the first piece: the sequence is aborted
    assert on.scheduler.idle and on.allocator.num_used == 0
    prompt = base[:32] + _rand(3, seed=41)
    got, saved, _ = _run(on, [prompt], GREEDY, True)
    want, _, _ = _run(off, [prompt], GREEDY, True)
    assert got == want and saved == 32


def test_greedy_after_a_cached_prefix_matches_transformers(on):
    from tests.e2e.conftest import hf_greedy, hf_model

    base = _rand(36, seed=50)
    on.generate([base], GREEDY)
    prompt = base[:34]
    before = on.scheduler.reused_tokens
    out = on.generate([prompt], replace(GREEDY, max_tokens=8))[0].token_ids
    assert on.scheduler.reused_tokens - before == 32
    assert out == hf_greedy(hf_model("tiny-llama"), prompt, 8)
