import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.sampling import (
    Finish,
    SamplingParams,
    StopChecker,
    apply_repetition_penalty,
    find_stop,
    holdback,
    sampling_inputs,
)


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (16, 1.0, 1.0, 0, 0.0, 1.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (None, (), (), False)
    assert not p.greedy and SamplingParams(temperature=0).greedy


def test_normalisation_and_immutability():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[7, 9], max_tokens=None)
    assert p.top_k == 0 and p.stop == ("###",) and p.stop_token_ids == (7, 9) and p.max_tokens is None
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert hash(p) == hash(SamplingParams(top_k=0, stop=("###",), stop_token_ids=(7, 9), max_tokens=None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-2), "top_k must be 0 or -1 (off) or >= 1, got -2"),
    (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0"),
    (dict(max_tokens=0), "max_tokens must be >= 1 or None, got 0"),
    (dict(seed=1.5), "seed must be an int or None, got 1.5"),
    (dict(stop=["ok", ""]), "stop must hold non-empty strings, got ('ok', '')"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids must hold token ids >= 0, got (3, -1)"),
])
def test_validation_errors_are_one_clear_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


def _penalty_by_loop(logits, token_ids, penalties):
    out = logits.clone()
    for s, ids in enumerate(token_ids):
        penalty = torch.tensor(penalties[s], dtype=torch.float32)
        for t in set(ids):
            x = logits[s, t]
            out[s, t] = x / penalty if x > 0 else x * penalty
    return out


def test_repetition_penalty_matches_the_rule():
    S, V = 5, 37
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, V, generator=g)
    ids = [[1, 1, 5, 36, 5], [], [0], list(range(0, V, 3)), [2, 2, 2]]
    penalties = [1.3, 2.0, 0.7, 1.1, 1.0]
    before = logits.clone()
    got = torch.from_numpy(apply_repetition_penalty(logits.numpy(), ids, np.array(penalties)))
    torch.testing.assert_close(got, _penalty_by_loop(logits, ids, penalties), rtol=0, atol=0)
    assert torch.equal(logits, before), "the input logits are left alone"
    assert torch.equal(got[1], logits[1]) and torch.equal(got[4], logits[4])
    assert np.array_equal(apply_repetition_penalty(logits.numpy(), [[]] * S, penalties), logits.numpy())


def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    want = RepetitionPenaltyLogitsProcessor(1.25)(ids, logits.clone())
    got = apply_repetition_penalty(logits.numpy(), ids.tolist(), [1.25] * 3)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=0)


def test_sampling_inputs_roles_and_greedy_rows():
    params = [SamplingParams(temperature=0, top_k=5, top_p=0.5), SamplingParams(temperature=0.7, top_k=40, min_p=0.1)]
    got = sampling_inputs(params, seeds=[3, (1 << 64) - 1], offsets=[0, 12])
    assert {k: v.dtype for k, v in got.items()} == {
        "temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32,
        "seeds": np.int64, "offsets": np.int64}
    assert all(isinstance(v, np.ndarray) for v in got.values())  # host arrays: the engine's interface
    assert got["temperature"].tolist() == [0.0, pytest.approx(0.7)]
    assert got["top_k"].tolist() == [0, 40] and got["top_p"].tolist() == [1.0, 1.0]
    assert got["min_p"].tolist() == [0.0, pytest.approx(0.1)]
    assert got["seeds"].tolist() == [3, -1] and got["offsets"].tolist() == [0, 12]


def test_find_stop_and_holdback():
    assert find_stop("hello world", ["wor", "lo"], new_chars=5) == (6, "wor")  # "lo" was checked before
    assert find_stop("hello world", ["wor", "lo"], new_chars=8) == (3, "lo")  # the earliest match wins
    assert find_stop("hello world", ["lo"], new_chars=2) is None  # "lo" lies in text already checked
    assert find_stop("abc<|e", ["<|end|>"], new_chars=2) is None
    assert find_stop("abc<|end|>x", ["<|end|>"], new_chars=5) == (3, "<|end|>")
    assert holdback("abc<|e", ["<|end|>"]) == 3 and holdback("abc<", ["<|end|>", "<<"]) == 1
    assert holdback("abc", ["<|end|>"]) == 0 and holdback("", ["xy"]) == 0


def test_stop_checker_follows_vllm_order():
    p = SamplingParams(max_tokens=4, stop=["\n\n"], stop_token_ids=[99])
    check = StopChecker(p, frozenset({2})).check
    assert check(5, "Hi", 2, 1) is None
    assert check(2, "Hi</s>", 4, 2) == Finish("stop", "Hi")  # eos: its text is not output
    assert check(99, "Hi!", 1, 2) == Finish("stop", "Hi", 99)
    assert check(7, "Hi.\n\nMore", 7, 2) == Finish("stop", "Hi.", "\n\n")
    assert check(7, "Hi there", 6, 4) == Finish("length", "Hi there")
    ignoring = StopChecker(dataclasses.replace(p, ignore_eos=True), frozenset({2}))
    assert ignoring.check(2, "Hi", 0, 2) is None
    assert StopChecker(p).releasable("Hi.\n") == 3


def test_no_triton_or_kernels_import():
    root = Path(__file__).resolve().parents[2]
    code = ("import sys, runtime.sampling; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'kernels')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
