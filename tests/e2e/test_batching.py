"""Continuous batching: eight prompts of different lengths generated together give what each gives alone.

Greedy decoding makes "alone" the exact oracle: a row's logits must not depend on which other sequences share
its steps, where their KV blocks live, or whether it waited or was preempted. Checked on the real model with
the torch backend (once with room for every sequence, once with a KV cache too small for all of them), and on
a tiny model with the interpret backend, where the batched steps run the artifact's own kernels.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from runtime.engine import Engine, load
from tests.e2e.conftest import greedy, random_prompt

TEXT_PROMPTS = (
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three primary colours, then three secondary ones:",
    "def fibonacci(n):",
    "Once upon a time, in a village by the mountains, there lived",
    "Translate to French: I would like a cup of coffee and a croissant, please.",
    "The mitochondria is the powerhouse of the cell. Explain what that means in simple words for a child of "
    "eight, with one example from everyday life.",
)
MAX_TOKENS = (12, 5, 16, 9, 3, 14, 7, 10)  # sequences finish at different steps while others keep decoding
TINY = "tiny-llama3"
TINY_LENGTHS = (1, 2, 4, 7, 13, 16, 17, 29)  # within a block, block edges, two blocks
TINY_MAX_TOKENS = (5, 3, 6, 2, 4, 6, 3, 5)


@contextmanager
def rows_per_step(engine: Engine):
    """Record how many sequences each forward step of ``engine`` carried."""
    seen: list[tuple[str, int]] = []
    # the program backends (interpret, cuda) run a step through _forward, which leaves the logits on the device
    name = "_forward" if hasattr(engine.backend, "_forward") else "forward"
    forward = getattr(engine.backend, name)
    setattr(engine.backend, name, lambda step, *a: (seen.append((step.kind, step.S)), forward(step, *a))[1])
    try:
        yield seen
    finally:
        delattr(engine.backend, name)


def _check_batched_equals_alone(engine: Engine, prompts, max_tokens, min_rows: int) -> list[tuple[str, int]]:
    params = [greedy(n) for n in max_tokens]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert [len(t) for t in alone] == list(max_tokens)
    with rows_per_step(engine) as steps:
        together = engine.generate(list(prompts), params)
    assert [o.token_ids for o in together] == alone
    assert max(s for kind, s in steps if kind == "decode") >= min_rows, steps  # they did share steps
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
    return steps


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_artifact):
    engine = load(smollm2_artifact, backend="torch", kv_cache_gb=0.25)
    lengths = [len(engine.tokenizer.encode(p)) for p in TEXT_PROMPTS]
    assert len(set(lengths)) == len(lengths), lengths
    return engine, lengths


def test_smollm2_torch_batched_equals_alone(smollm2_prompts):
    engine, _ = smollm2_prompts
    _check_batched_equals_alone(engine, TEXT_PROMPTS, MAX_TOKENS, min_rows=len(TEXT_PROMPTS))


def test_smollm2_torch_with_too_few_kv_blocks(smollm2_artifact, smollm2_prompts):
    """Six blocks of 16 tokens hold two or three of these sequences: the rest wait (or are preempted)."""
    _, lengths = smollm2_prompts
    engine = load(smollm2_artifact, backend="torch", max_blocks_total=6)
    assert engine.backend.num_blocks == 6
    assert sum(-(-(n + m) // 16) for n, m in zip(lengths, MAX_TOKENS)) > 2 * engine.backend.num_blocks
    steps = _check_batched_equals_alone(engine, TEXT_PROMPTS, MAX_TOKENS, min_rows=2)
    assert max(s for _, s in steps) < len(TEXT_PROMPTS)


def test_tiny_interpret_batched_equals_alone(tiny_artifact):
    engine = load(tiny_artifact(TINY), backend="interpret")
    prompts = [random_prompt(engine.vocab_size, n, seed=300 + n) for n in TINY_LENGTHS]
    # max_batch 4: at most four sequences per step, the other four wait for a slot
    steps = _check_batched_equals_alone(engine, prompts, TINY_MAX_TOKENS, min_rows=engine.limits.max_batch)
    assert max(s for _, s in steps) == engine.limits.max_batch
