"""The interpret backend runs a built artifact's own index.json (every kernel through the Triton interpreter)
and must give the torch backend's logits: a prefill of two sequences, decode steps, decode steps padded to a
CUDA-graph bucket (what graph replay does on the GPU), full-prompt logits (R = T) and sampling.

fp32 throughout: both backends accumulate in fp32 and fp32 dots are exact (no TF32), so the two differ by
reduction order only; 1e-4 relative (Frobenius) leaves a wide margin over that and fails on any real bug.
"""

import numpy as np
import pytest
import torch

from runtime.step import Chunk, make_step

REL = 1e-4


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from compiler.build import build
    from runtime.artifact import load_artifact
    from runtime.backends import make_backend

    out = build("tiny-llama", tmp_path_factory.mktemp("art") / "tiny", targets=["cuda:90"], dtype="fp32",
                max_seq_len=128, max_batch=4, reference=False)
    artifact = load_artifact(out.out)
    return make_backend("interpret", artifact, max_blocks_total=24), make_backend("torch", artifact,
                                                                                  max_blocks_total=24)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)  # every backend returns host arrays
    assert a.shape == b.shape and not np.isnan(a).any()
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_then_decode_matches_the_torch_backend(backends):
    interp, ref = backends
    vocab, width = interp.program.vocab_size, interp.program.max_blocks
    # awkward lengths, blocks out of order: 19 tokens over blocks 9 then 2, 6 tokens in block 11
    tables = [[9, 2], [11]]
    prompts = [_ids(19, 1, vocab), _ids(6, 2, vocab)]
    step = make_step("prefill", [Chunk(p, 0, t) for p, t in zip(prompts, tables)], 16, width)
    assert _rel(interp.forward(step), ref.forward(step)) < REL
    for k in range(2):
        chunks = [Chunk([(7 * k + 3) % vocab], 19 + k, tables[0]), Chunk([(5 * k + 1) % vocab], 6 + k, tables[1])]
        step = make_step("decode", chunks, 16, width)
        assert _rel(interp.forward(step), ref.forward(step)) < REL


def test_padded_decode_rows_change_nothing(backends):
    """Decode padded to a bucket (as CUDA-graph replay runs it): real rows bit-identical to the unpadded step,
    and the padding rows write nothing into the KV cache."""
    from runtime.backends.interpret import run_interpreted

    interp, _ = backends
    p = interp.program
    width = p.max_blocks
    tables = [[3], [4, 6], [8]]
    lens = [5, 17, 2]
    g = torch.Generator().manual_seed(3)
    for cache in p.caches.values():  # any cached prefix will do: the padded and unpadded steps read the same one
        cache.copy_(torch.randn(cache.shape, generator=g))
    step = make_step("decode", [Chunk([i + 1], n, t) for i, (n, t) in enumerate(zip(lens, tables))], 16, width)
    before = {k: v.clone() for k, v in p.caches.items()}
    eager = torch.from_numpy(interp.forward(step))
    after = {k: v.clone() for k, v in p.caches.items()}
    for k, v in before.items():  # back to the cache before the step, then the padded run must redo its writes
        p.caches[k].copy_(v)
    env = p.load_step(step, pad_to=4)
    assert env == {"T": 4, "S": 4, "R": 4}
    for launch in p.launches("decode", env):
        run_interpreted(launch, env)
    assert torch.equal(p.logits(3), eager)
    assert not p.logits(4)[3].isnan().any()
    for k in p.caches:
        assert torch.equal(p.caches[k], after[k]), f"{k}: padding row wrote into the cache"


def test_every_position_logits_of_a_chunk(backends):
    """R = T rows (Engine.logits' chunked prefill) continuing a cached prefix."""
    interp, ref = backends
    vocab, width = interp.program.vocab_size, interp.program.max_blocks
    ids = _ids(7, 5, vocab)
    for b in backends:
        b.forward(make_step("prefill", [Chunk(ids[:3], 0, [7])], 16, width, all_logits=True))
    step = make_step("prefill", [Chunk(ids[3:], 3, [7])], 16, width, all_logits=True)
    got, want = interp.forward(step), ref.forward(step)
    assert got.shape == (4, vocab) and _rel(got, want) < REL


def test_sampling_kernel_through_the_index(backends):
    interp, _ = backends
    vocab = interp.program.vocab_size
    logits = np.random.default_rng(11).standard_normal((3, vocab), dtype=np.float32)
    zeros, z64 = np.zeros(3, np.float32), np.zeros(3, np.int64)
    greedy = interp.sample(logits, zeros, np.zeros(3, np.int32), np.ones(3, np.float32), zeros, z64, z64)
    assert greedy.dtype == np.int32 and np.array_equal(greedy, logits.argmax(-1))
    # top_k 1 at any temperature is greedy too; other rows draw a valid token reproducibly from their seed
    args = (np.full(3, 0.9, np.float32), np.array([1, 0, 5], np.int32), np.ones(3, np.float32), zeros,
            np.array([4, 5, 6], np.int64), z64)
    a, b = interp.sample(logits, *args), interp.sample(logits, *args)
    assert np.array_equal(a, b) and a[0] == logits[0].argmax() and ((a >= 0) & (a < vocab)).all()
    top5 = np.argsort(-logits[2])[:5]
    assert a[2] in top5
