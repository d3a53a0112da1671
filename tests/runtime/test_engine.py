"""The engine on the torch backend over a built tiny-llama (fp32): logits vs the HF reference, continuous
batching equal to one-at-a-time, preemption, seeded sampling, stop conditions, streaming."""

import numpy as np
import pytest
import torch

from runtime.engine import load
from runtime.sampling import SamplingParams
from tests.runtime.tiny_artifact import tiny_artifact

# Eight prompts of awkward lengths: one token, within a block, block edges, a chunked prompt (> max_batch tokens
# per logits chunk and several KV blocks).
LENGTHS = (1, 3, 7, 15, 16, 17, 33, 50)


@pytest.fixture(scope="module")
def engine():
    return load(tiny_artifact(), backend="torch")


@pytest.fixture(scope="module")
def small_engine():
    """Ten KV blocks: eight prompts of up to 70 tokens cannot all run at once, so some are preempted."""
    return load(tiny_artifact(), backend="torch", max_blocks_total=10)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_logits_match_the_reference(engine):
    ids, ref = engine.artifact.reference()
    out = engine.logits(ids)
    # numpy fp32 on the host, on every backend (README: Engine.logits)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == ref.shape
    assert _rel(out, ref) <= 1e-4
    assert engine.allocator.num_free == engine.backend.num_blocks, "logits() must give its blocks back"


def test_greedy_generation_is_the_argmax_of_full_logits(engine):
    prompt = _prompts(engine.vocab_size)[3]
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    ids, expected = list(prompt), []
    for _ in range(6):
        expected.append(int(engine.logits(ids)[-1].argmax()))
        ids.append(expected[-1])
    assert out.token_ids == expected and out.prompt_token_ids == prompt and out.finish_reason == "length"


def test_batched_greedy_equals_each_alone(engine, small_engine):
    prompts = _prompts(engine.vocab_size, seed=1)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (9, 4, 12, 7, 20, 3, 11, 20)]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = engine.generate(prompts, params)
    assert [o.token_ids for o in together] == alone
    assert [len(t) for t in alone] == [sp.max_tokens for sp in params]
    squeezed = small_engine.generate(prompts, params)
    assert [o.token_ids for o in squeezed] == alone
    for e in (engine, small_engine):
        assert e.scheduler.idle and e.allocator.num_free == e.backend.num_blocks


def test_preemption_happens_with_a_small_cache(small_engine):
    prompts = _prompts(small_engine.vocab_size, seed=2)
    seen = []
    original = small_engine.scheduler.preempt
    small_engine.scheduler.preempt = lambda seq: (seen.append(seq.seq_id), original(seq))
    try:
        small_engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    finally:
        del small_engine.scheduler.preempt
    assert seen, "ten blocks for eight growing sequences should force preemption"


def test_seeded_sampling_survives_preemption(engine, small_engine):
    prompts = _prompts(engine.vocab_size, seed=5)
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    assert [o.token_ids for o in small_engine.generate(prompts, params)] == \
        [o.token_ids for o in engine.generate(prompts, params)]


def test_max_tokens_none_fills_the_sequence(engine):
    out = engine.generate([[5] * 120], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_independent_of_batching(engine):
    prompts = _prompts(engine.vocab_size, seed=3)
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.generate([prompts[2]], sp)[0].token_ids
    assert engine.generate([prompts[2]], sp)[0].token_ids == alone
    batched = engine.generate(prompts, [SamplingParams(max_tokens=10, temperature=1.0, seed=i, ignore_eos=True)
                                        for i in range(len(prompts))][:2] + [sp] + [SamplingParams(max_tokens=5)] * 5)
    assert batched[2].token_ids == alone
    other = engine.generate([prompts[2]], SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9,
                                                         seed=99, ignore_eos=True))[0].token_ids
    assert other != alone
    unseeded = [engine.generate([prompts[2]], SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))[0]
                .token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1], "without a seed each request draws its own"


def test_max_tokens_and_stop_token_ids(engine):
    prompt = _prompts(engine.vocab_size)[2]
    full = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    cut = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[stop_tok]))[0]
    assert cut.token_ids == full.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cut.text == engine.tokenizer.decode(full.token_ids[:first])


def test_eos_stops_unless_ignored(engine, monkeypatch):
    prompt = _prompts(engine.vocab_size)[4]
    full = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    eos = full.token_ids[3]
    first = full.token_ids.index(eos)
    monkeypatch.setattr(type(engine.tokenizer), "eos_token_ids", property(lambda self: [eos]), raising=False)
    out = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop"
    ignored = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == full.token_ids


def test_stop_strings_cut_the_text(engine):
    prompt = "The capital of France is"
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    text = full.text
    clean = [i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3]]
    assert clean, f"generated text too short or garbled for the test: {text!r}"
    stop = text[clean[len(clean) // 2]:][:3]
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert full.token_ids[: len(out.token_ids)] == out.token_ids and len(out.token_ids) < len(full.token_ids)
    pieces = list(engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])))
    assert "".join(pieces) == out.text
    assert "".join(engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))) == text


def _penalised_greedy(engine, prompt: list[int], r: float, n: int) -> list[int]:
    """Greedy continuation with the HF / vLLM repetition penalty, from full-prefill logits."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = torch.from_numpy(engine.logits(ids)[-1].copy())
        seen = torch.tensor(sorted(set(ids)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / r, logits[seen] * r)
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_repetition_penalty_matches_a_direct_computation(engine):
    prompts = _prompts(engine.vocab_size, seed=4)[-2:]  # long prompts: many seen tokens for the penalty to hit
    r = 3.0
    expected = [_penalised_greedy(engine, p, r, 6) for p in prompts]
    plain = [_penalised_greedy(engine, p, 1.0, 6) for p in prompts]
    assert expected != plain, "the penalty should change a greedy continuation here"
    params = [SamplingParams(max_tokens=6, temperature=0, repetition_penalty=r, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    outs = engine.generate(prompts + prompts, [params[0]] * 2 + [params[1]] * 2)
    assert [o.token_ids for o in outs] == expected + plain


def test_too_long_requests_are_refused(engine):
    with pytest.raises(ValueError, match="max_seq_len 128"):
        engine.generate([[5] * 129])
    with pytest.raises(ValueError, match="max_seq_len 128"):
        engine.generate([[5] * 100], SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="max_seq_len 128"):
        engine.logits([5] * 129)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        engine.generate([[engine.vocab_size]])
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks


def test_abandoned_stream_frees_its_blocks(engine):
    stream = engine.stream([5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
