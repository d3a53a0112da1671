import random

import numpy as np
import pytest

from runtime.kv_cache import BlockAllocator
from runtime.scheduler import PENDING, Scheduler, Sequence
from runtime.step import Chunk, make_step

BS = 4


class FakeModel:
    """A paged 'model' whose next token depends on every cached token: a misplaced block changes the output.

    It keeps one token per cache slot, writes each step's tokens by slot mapping and reads each
    sequence's context back through its block table, checking it against the scheduler's view.
    """

    def __init__(self, num_blocks: int, max_blocks: int):
        self.slots = [None] * (num_blocks * BS)
        self.max_blocks = max_blocks
        self.steps = []

    def run(self, sched: Scheduler, batch) -> list[int]:
        step = make_step(batch.kind, batch.chunks(), BS, self.max_blocks)
        self.steps.append((batch.kind, step.T, step.S))
        for tok, slot in zip(step.ids.tolist(), step.slot_mapping.tolist()):
            self.slots[slot] = tok
        out = []
        for row, seq in enumerate(batch.seqs):
            n = int(step.seq_lens[row])
            table = step.block_tables[row].tolist()
            ctx = [self.slots[table[p // BS] * BS + p % BS] for p in range(n)]
            assert ctx == seq.token_ids[:n], "cache does not hold the sequence's tokens"
            out.append(sum((i + 1) * t for i, t in enumerate(ctx)) * 31 % 1009)
        return out


def generate(prompts, max_tokens, num_blocks, max_batch=4, max_num_tokens=16, max_seq_len=64, prefix_cache=True):
    alloc = BlockAllocator(num_blocks)
    sched = Scheduler(alloc, BS, max_batch, max_num_tokens, max_seq_len, prefix_cache=prefix_cache)
    model = FakeModel(num_blocks, -(-max_seq_len // BS))
    seqs = [Sequence(i, p, m, sched.new_table()) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    for s in seqs:
        sched.add(s)
    while (batch := sched.schedule()) is not None:
        assert len(batch.seqs) <= max_batch and len(sched.running) <= max_batch
        if batch.kind == "prefill":
            assert batch.num_tokens <= max_num_tokens
        else:
            assert batch.counts == [1] * len(batch.seqs)
        for seq, _ in sched.update(batch, model.run(sched, batch)):
            if seq.num_generated == seq.max_tokens:
                sched.finish(seq)
    assert alloc.num_free == num_blocks, "blocks leaked"
    return seqs, model


def _prompts(n, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 1000) for _ in range(rng.randrange(1, 30))] for _ in range(n)]
    return prompts, [rng.randrange(1, 20) for _ in range(n)]


def _alone(prompts, max_tokens):
    return [generate([p], [m], num_blocks=64)[0][0].generated for p, m in zip(prompts, max_tokens)]


def test_many_prompts_batched_equal_alone():
    prompts, max_tokens = _prompts(13)
    seqs, model = generate(prompts, max_tokens, num_blocks=64)
    assert [s.generated for s in seqs] == _alone(prompts, max_tokens)
    assert all(s.num_preemptions == 0 for s in seqs)
    assert any(S > 1 for kind, T, S in model.steps if kind == "decode"), "decode never batched"
    assert [len(s.generated) for s in seqs] == max_tokens


def test_preemption_when_blocks_run_out_changes_nothing():
    prompts, max_tokens = _prompts(11, seed=1)
    seqs, _ = generate(prompts, max_tokens, num_blocks=13)  # the largest request needs 12 blocks
    assert sum(s.num_preemptions for s in seqs) > 0, "the test should force preemption"
    assert [s.generated for s in seqs] == _alone(prompts, max_tokens)


def test_long_prompt_is_prefilled_in_chunks():
    prompt = list(range(1, 40))
    seqs, model = generate([prompt, [5, 6]], [3, 3], num_blocks=64, max_num_tokens=16)
    prefill_tokens = [T for kind, T, S in model.steps if kind == "prefill"]
    assert prefill_tokens[:3] == [16, 16, 9]  # 39 = 16 + 16 + 7, the short prompt joins the last chunk
    assert [s.generated for s in seqs] == _alone([prompt, [5, 6]], [3, 3])


def test_new_requests_wait_while_blocks_are_short():
    alloc = BlockAllocator(4)
    sched = Scheduler(alloc, BS, max_batch=4, max_num_tokens=64, max_seq_len=16)
    # 3 blocks each at full length; different tokens, so that b cannot share a's blocks
    a, b = (Sequence(i, [i + 1] * 9, 3, sched.new_table()) for i in range(2))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.kind == "prefill" and batch.seqs == [a] and list(sched.waiting) == [b]
    sched.update(batch, [7])
    batch = sched.schedule()
    assert batch.kind == "decode" and batch.seqs == [a] and list(sched.waiting) == [b]
    sched.update(batch, [7])
    sched.finish(a)
    batch = sched.schedule()
    assert batch.kind == "prefill" and batch.seqs == [b]


def test_newest_running_sequence_is_preempted():
    alloc = BlockAllocator(3)
    # without the prefix cache it recomputes every token (test_prefix_cache: with it, it takes back its blocks)
    sched = Scheduler(alloc, BS, max_batch=4, max_num_tokens=64, max_seq_len=16, prefix_cache=False)
    old, new = Sequence(0, [1] * 4, 4, sched.new_table()), Sequence(1, [2] * 4, 4, sched.new_table())
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert batch.seqs == [old, new] and alloc.num_free == 1
    sched.update(batch, [3, 4])
    batch = sched.schedule()  # both need a second block for position 4, one is free: the newer one yields
    assert batch.kind == "decode" and batch.seqs == [old] and list(sched.waiting) == [new]
    assert new.num_cached == 0 and new.num_preemptions == 1 and new.table.blocks == []
    assert new.token_ids == [2] * 4 + [4], "a preempted sequence keeps the tokens it generated"
    sched.update(batch, [3])
    batch = sched.schedule()  # new needs 2 blocks to be recomputed, 1 is free: old keeps decoding
    assert batch.kind == "decode" and batch.seqs == [old]
    sched.update(batch, [3])
    sched.finish(old)
    batch = sched.schedule()
    assert batch.kind == "prefill" and batch.seqs == [new] and batch.counts == [5]


def test_too_long_requests_are_refused_up_front():
    sched = Scheduler(BlockAllocator(8), BS, max_batch=2, max_num_tokens=8, max_seq_len=20)
    with pytest.raises(ValueError, match="max_seq_len 20"):
        sched.add(Sequence(0, [1] * 21, 1, sched.new_table()))
    with pytest.raises(ValueError, match=r"max_tokens \(6\).*max_seq_len 20.*at most 5"):
        sched.add(Sequence(0, [1] * 15, 6, sched.new_table()))
    with pytest.raises(ValueError, match="empty"):
        sched.add(Sequence(0, [], 6, sched.new_table()))
    small = Scheduler(BlockAllocator(2), BS, max_batch=2, max_num_tokens=8, max_seq_len=20)
    with pytest.raises(ValueError, match="needs 3 KV blocks but the cache has only 2"):
        small.add(Sequence(0, [1] * 9, 1, small.new_table()))
    assert sched.idle and small.idle


def test_make_step_tensors():
    chunks = [Chunk([11, 12, 13], 2, [5, 6]), Chunk([21], 0, [2])]
    step = make_step("prefill", chunks, block_size=4, max_blocks=3)
    i32 = lambda xs: np.array(xs, dtype=np.int32)
    assert np.array_equal(step.ids, i32([11, 12, 13, 21]))
    assert np.array_equal(step.positions, i32([2, 3, 4, 0]))
    assert np.array_equal(step.slot_mapping, i32([5 * 4 + 2, 5 * 4 + 3, 6 * 4, 2 * 4]))
    assert np.array_equal(step.cu_seqlens_q, i32([0, 3, 4]))
    assert np.array_equal(step.seq_lens, i32([5, 1]))
    assert np.array_equal(step.block_tables, i32([[5, 6, 0], [2, 0, 0]]))
    assert np.array_equal(step.last_idx, i32([2, 3]))
    assert (step.T, step.S, step.R) == (4, 2, 2)
    assert all(isinstance(t, np.ndarray) and t.dtype == np.int32 for t in step.inputs().values())
    every = make_step("prefill", chunks, block_size=4, max_blocks=3, all_logits=True)
    assert np.array_equal(every.last_idx, i32([0, 1, 2, 3])) and every.R == 4


def test_make_step_rejects_bad_chunks():
    with pytest.raises(ValueError, match="do not fit"):
        make_step("prefill", [Chunk([1, 2, 3], 2, [5])], block_size=4, max_blocks=3)
    with pytest.raises(ValueError, match="one token per sequence"):
        make_step("decode", [Chunk([1, 2], 0, [5])], block_size=4, max_blocks=3)


def test_one_step_ahead_placeholders_defer_and_the_dropped_extra_token():
    """What the engine's asynchronous decode relies on: a PENDING token per launched row, no preemption while a
    step is in flight, no step past max_tokens, and finish() dropping a token scheduled after the last one."""
    alloc = BlockAllocator(3)
    sched = Scheduler(alloc, BS, max_batch=4, max_num_tokens=64, max_seq_len=16)
    old, new = Sequence(0, [1] * 3, 2, sched.new_table()), Sequence(1, [2] * 4, 4, sched.new_table())
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert sched.launched(batch) == [(0, old, 3), (1, new, 4)]
    assert old.token_ids == [1, 1, 1, PENDING] and new.token_ids == [2] * 4 + [PENDING]
    # Position 4 of `new` needs a block and one is free: both decode, the pending tokens as their inputs.
    batch = sched.schedule(defer=True)
    assert batch.kind == "decode" and batch.seqs == [old, new] and batch.starts == [3, 4]
    assert [c.token_ids for c in batch.chunks()] == [[PENDING], [PENDING]] and alloc.num_free == 0
    sched.launched(batch)
    old.token_ids[3], new.token_ids[4] = 5, 8  # the first step's ids arrive, the second step's are in flight
    assert old.token_ids[4] == PENDING and old.num_generated == old.max_tokens
    assert sched.schedule(defer=True).seqs == [new], "a sequence whose last token is in flight takes no step"
    # Suppose 8 was a stop token for `new`: the step in flight sampled one token past its end, which is dropped.
    sched.finish(new, num_tokens=5)
    assert new.token_ids == [2] * 4 + [8] and alloc.num_free == 2


def test_defer_returns_none_where_a_preemption_would_be_needed():
    alloc = BlockAllocator(3)
    sched = Scheduler(alloc, BS, max_batch=4, max_num_tokens=64, max_seq_len=16)
    old, new = Sequence(0, [1] * 4, 4, sched.new_table()), Sequence(1, [2] * 4, 4, sched.new_table())
    sched.add(old)
    sched.add(new)
    sched.update(sched.schedule(), [3, 4])
    assert sched.schedule(defer=True) is None and sched.running == [old, new] and not sched.waiting
    batch = sched.schedule()  # with every id known, the newer one yields as without a step in flight
    assert batch.seqs == [old] and list(sched.waiting) == [new]


class WindowModel(FakeModel):
    """A sliding-window 'model': a step reads the keys from its first query's window on, and its next token
    depends on the last WINDOW tokens only, so a block given back too early shows up as a wrong context."""

    WINDOW = 5

    def run(self, sched: Scheduler, batch) -> list[int]:
        step = make_step(batch.kind, batch.chunks(), BS, self.max_blocks)
        for tok, slot in zip(step.ids.tolist(), step.slot_mapping.tolist()):
            self.slots[slot] = tok
        out = []
        for row, (seq, count) in enumerate(zip(batch.seqs, batch.counts)):
            n = int(step.seq_lens[row])
            table = step.block_tables[row].tolist()
            lo = max(0, n - count - self.WINDOW + 1)
            ctx = [self.slots[table[p // BS] * BS + p % BS] for p in range(lo, n)]
            assert ctx == seq.token_ids[lo:n], "a block inside the window was given back"
            out.append(sum((i + 1) * t for i, t in enumerate(seq.token_ids[max(0, n - self.WINDOW):n])) * 31 % 1009)
        return out


def test_sliding_window_gives_back_blocks_behind_every_window():
    def run(window, num_blocks):
        alloc = BlockAllocator(num_blocks)
        sched = Scheduler(alloc, BS, 4, 16, 64, window=window)
        model = WindowModel(num_blocks, 16)
        seqs = [Sequence(i, p, 30, sched.new_table()) for i, p in enumerate(_prompts(3, seed=4)[0])]
        for s in seqs:
            sched.add(s)
        peak = 0
        while (batch := sched.schedule()) is not None:
            if batch.kind == "decode":  # a prefill holds its whole prompt's blocks until it has run
                peak = max(peak, alloc.num_used)
            for seq, _ in sched.update(batch, model.run(sched, batch)):
                if seq.num_generated == seq.max_tokens:
                    sched.finish(seq)
        assert alloc.num_free == num_blocks, "blocks leaked"
        return [s.generated for s in seqs], peak

    full, full_peak = run(0, 64)
    windowed, peak = run(WindowModel.WINDOW, 64)
    assert windowed == full
    # Five consecutive positions (the window of the step's query, which includes its own) touch at most two
    # blocks of four: two per running sequence.
    assert peak <= 3 * 2 < full_peak
