"""Continuous batching: a waiting queue and a running set, one step at a time (after nano-vllm; the mixed steps
after vLLM's chunked prefill).

Every step carries at most ``max_num_tokens`` tokens (the token budget, ``--max-num-batched-tokens``); at most
min(max_batch, budget) sequences run at once, so that one decode token each always fits. A step takes:
  decode   first, one token for every running sequence, as a 1-token chunk continuing its cached prefix. When a
           sequence's next token needs a block and none is free, the newest sequence yields: a prompt in the
           middle of its chunked prefill first (it holds blocks for its whole prompt), else the newest running
           one, whose blocks are freed and which goes back to the head of the queue with every token it has so
           far, to be recomputed later.
  prefill  then, with what is left of the budget, waiting sequences in arrival order while the batch and the KV
           blocks allow. A prompt longer than what is left is prefilled in chunks over several steps, each
           continuing its cached prefix; it holds the head of the queue (and the blocks for its whole prompt)
           until its last chunk has run, while the running sequences keep decoding beside it.
A step with a prompt chunk is a "prefill" step (the prefill kernels take any chunk lengths); one of decode tokens
alone is a "decode" step (CUDA graphs). A step that preempted admits nothing: the blocks it freed go to the running
sequences. ``mixed=False`` gives the former behaviour: a step is all prefill or all decode, and prefill comes first
whenever a waiting sequence can be admitted (the running ones wait for its whole prefill). Nothing is dropped: a
request that could never fit is refused in ``add`` with a ValueError naming the limit.

Steps may be scheduled one ahead of their results (the engine's asynchronous decode): ``launched`` appends a
``PENDING`` placeholder for each token a step will sample, the engine writes the id in once it arrives, and a
sequence that ended meanwhile drops the one extra token it was scheduled for (``finish(seq, num_tokens)``).
``schedule(defer=True)`` refuses what needs every result first: it never preempts (a preempted sequence is
recomputed from its token ids, which must all be known) and returns None instead. It still mixes: the decode rows,
whose input may be PENDING, lead the step with one token each, which is what the engine's feed maps onto the
previous step's samples on the device (runtime/pipeline.py), whatever the step's kind.

Prefix caching (``prefix_cache``): once a launched step has written a sequence's KV up to the end of a block whose
tokens are all known, the block is keyed by its prefix (kv_cache.prefix_key) and stays keyed in the allocator after
the sequence ends, until evicted. A sequence about to be admitted (new, or preempted) first shares the keyed blocks
of its longest cached prefix and starts with ``num_cached`` past them, so only the rest is prefilled. The reuse stops
one token short of the sequence's end, rounded down to whole blocks: at least one token must run, for its step to
sample the next. Off for sliding-window models: they give back the blocks behind the window, a prefix's included.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.kv_cache import BlockAllocator, BlockTable, blocks_for
from runtime.step import Chunk

PENDING = -1  # a sampled token id still on its way from the device; only ever the input of a step's decode row


@dataclass(eq=False)
class Sequence:
    """One request's tokens (prompt, then generated) and where its KV lives."""

    seq_id: int
    token_ids: list[int]
    max_tokens: int
    table: BlockTable
    num_prompt_tokens: int = -1
    num_cached: int = 0  # leading tokens whose K/V are in the cache
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class Batch:
    """One scheduled step: for each sequence, ``counts[i]`` tokens starting at ``starts[i]``."""

    kind: str  # "prefill" (at least one prompt chunk, decode rows first) | "decode"
    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, start: int, count: int) -> None:
        self.seqs.append(seq)
        self.starts.append(start)
        self.counts.append(count)

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    def chunks(self) -> list[Chunk]:
        return [Chunk(s.token_ids[a:a + n], a, s.table.blocks) for s, a, n in zip(self.seqs, self.starts, self.counts)]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch: int, max_num_tokens: int,
                 max_seq_len: int, window: int = 0, prefix_cache: bool = True, mixed: bool = True) -> None:
        """max_num_tokens: the token budget of one step. window > 0: every attention layer of the model looks back
        at most ``window`` keys (sliding-window attention), so blocks wholly before the window of a sequence's next
        query are given back. prefix_cache: reuse the KV blocks of cached prefixes (the module docstring); always
        off with a window. mixed: decode tokens and prompt chunks share steps (the module docstring)."""
        self.window = window
        self.prefix_cache = prefix_cache and not window
        self.mixed = mixed
        self.reused_tokens = 0  # tokens admitted sequences took from cached prefixes instead of prefilling them
        self.preemptions = 0
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_num_tokens = max_num_tokens
        self.max_running = min(max_batch, max_num_tokens)  # so a decode step always fits the budget
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def new_table(self) -> BlockTable:
        return BlockTable(self.allocator, self.block_size)

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse, up front, a request that could never run (ValueError naming the limit)."""
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty: give at least one token")
        if num_prompt_tokens > self.max_seq_len:
            raise ValueError(f"the prompt has {num_prompt_tokens} tokens, more than this artifact's max_seq_len "
                             f"{self.max_seq_len}: shorten it or recompile with a larger max_seq_len")
        total = num_prompt_tokens + max_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} is beyond "
                             f"this artifact's max_seq_len {self.max_seq_len}: lower max_tokens to at most "
                             f"{self.max_seq_len - num_prompt_tokens}")
        need = blocks_for(total, self.block_size)
        if need > self.allocator.num_blocks:
            raise ValueError(f"a request of {total} tokens needs {need} KV blocks but the cache has only "
                             f"{self.allocator.num_blocks}: give a larger kv_cache_gb")

    def add(self, seq: Sequence) -> None:
        self.check(seq.num_prompt_tokens, seq.max_tokens)
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self, defer: bool = False) -> Batch | None:
        """The next step, or None when there is nothing to run (or, with ``defer``, nothing that can run before
        the results of the step in flight are in)."""
        if self.mixed:
            preemptions = self.preemptions
            batch = self._decode(defer)
            if batch is not None and self.preemptions == preemptions:
                self._prefill(batch)
        else:
            batch = self._prefill(Batch("prefill"))
            if not batch.seqs:
                batch = self._decode(defer)
        if batch is not None and batch.seqs:
            return batch
        if not self.idle and not defer:
            raise RuntimeError("scheduler stalled with work left: KV blocks leaked")
        return None

    def _prefill(self, batch: Batch) -> Batch:
        """Add prompt chunks to ``batch`` with what is left of the budget; it becomes a prefill step if any fits."""
        budget = self.max_num_tokens - batch.num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            reused = 0
            # A sequence in the middle of a chunked prefill already holds blocks for all its tokens.
            if self.prefix_cache and not seq.table.blocks:
                reused = seq.num_cached = seq.table.reuse(seq.token_ids, len(seq.token_ids) - 1)
            self._drop(seq, seq.num_cached)
            if not seq.table.ensure(len(seq.token_ids)):
                if reused:  # all or nothing: the shared blocks go back to the cache until the whole sequence fits
                    seq.table.release()
                    seq.num_cached = 0
                break
            self.reused_tokens += reused
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            batch.add(seq, seq.num_cached, n)
            batch.kind = "prefill"
            budget -= n
            if seq.num_cached + n < len(seq.token_ids):
                break  # the rest of this prompt goes in later steps, it keeps the head of the queue
            self.waiting.popleft()
            self.running.append(seq)
        return batch

    def _decode(self, defer: bool) -> Batch | None:
        batch = Batch("decode")
        # A sequence whose pending token is its last ends when that token arrives: it takes no more steps (nor
        # the KV block beyond max_tokens).
        queue = deque(s for s in self.running if s.num_generated < s.max_tokens)
        while queue:
            seq = queue.popleft()
            self._drop(seq, len(seq.token_ids) - 1)
            while not seq.table.ensure(len(seq.token_ids)):
                if defer:
                    return None
                if self._yield_partial():
                    continue
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                batch.add(seq, len(seq.token_ids) - 1, 1)
        return batch

    def _drop(self, seq: Sequence, first: int) -> None:
        """The step's first query sits at ``first``; no query from there on sees a key at or before
        first - window. Steps run in order on one stream, so a step still in flight has read its keys before
        a later step writes into a block given back here."""
        if self.window:
            seq.table.drop_before(first - self.window + 1)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to recompute later what the prefix cache no longer
        holds of it (its full blocks stay keyed until evicted)."""
        self.running.remove(seq)
        self._yield(seq)
        self.waiting.appendleft(seq)

    def _yield_partial(self) -> bool:
        """Free the blocks of a prompt in the middle of its chunked prefill (mixed steps only: otherwise no decode
        runs beside one); True if there was one. It is newer than every running sequence, so it yields first, and
        it must: it is the head of the queue, so a running sequence preempted instead would queue before it and
        could wait for blocks that it holds, forever. It stays at the head, to start again."""
        head = self.waiting[0] if self.waiting else None
        if head is None or not head.table.blocks:  # only a partly prefilled head holds blocks while it waits
            return False
        self._yield(head)
        return True

    def _yield(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_cached = 0
        seq.num_preemptions += 1
        self.preemptions += 1

    def launched(self, batch: Batch) -> list[tuple[int, Sequence, int]]:
        """Record that ``batch`` is on its way: a PENDING token for each sequence it caches fully.

        Returns (row, sequence, index in its token_ids) for those rows; the rows of a chunk that is not a
        prompt's last sample nothing.
        """
        out = []
        for row, (seq, count) in enumerate(zip(batch.seqs, batch.counts)):
            seq.num_cached += count
            self._publish(seq)
            if seq.num_cached == len(seq.token_ids):
                out.append((row, seq, len(seq.token_ids)))
                seq.token_ids.append(PENDING)
        return out

    def _publish(self, seq: Sequence) -> None:
        """Key the sequence's full blocks that launched steps write (``num_cached``) and whose tokens are known.

        Keying a block whose writing step is launched but maybe still running is safe: steps run in order on one
        stream, so any step that reads the block through another sequence, launched later, runs after it (as a
        step that overwrites an evicted block runs after every step that read it). A block whose last token is
        still PENDING is keyed by a later call, once the id is in: the key is made of the ids."""
        if not self.prefix_cache:
            return
        known = min(seq.num_cached, len(seq.token_ids))
        while known and seq.token_ids[known - 1] == PENDING:  # placeholders only ever sit at the end
            known -= 1
        seq.table.publish(seq.token_ids, known)

    def _release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks, keying first the full ones its launched steps wrote."""
        self._publish(seq)
        seq.table.release()

    def update(self, batch: Batch, sampled: list[int]) -> list[tuple[Sequence, int]]:
        """Record that ``batch`` ran; append each sampled token to a sequence that was fully cached by it.

        Returns (sequence, new token) pairs; rows of a chunk that is not a prompt's last are dropped.
        """
        out = []
        for row, seq, i in self.launched(batch):
            seq.token_ids[i] = int(sampled[row])
            out.append((seq, seq.token_ids[i]))
        return out

    def finish(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """A sequence is done: free its blocks. ``num_tokens``: its length at the token that ended it; a token
        scheduled after that one (still PENDING) is dropped."""
        self.running.remove(seq)
        if num_tokens is not None:
            del seq.token_ids[num_tokens:]
        self._release(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (the caller stopped consuming it): free what it holds."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.table.blocks:
            self._release(seq)
