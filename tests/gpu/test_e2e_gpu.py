"""End to end on the GPU: bf16 and fp16 artifacts compiled for this GPU, cuda backend, against HF on the GPU.

Tolerances come from measurements of the same models on the CPU in each dtype (HF transformers, and trilite's
torch backend on bf16/fp16 artifacts; relative error of all logits against HF fp32):

    dtype  HF vs fp32        trilite vs fp32   trilite vs HF same dtype   unit roundoff
    bf16   1.6e-2 .. 3.6e-2  1.0e-2 .. 2.6e-2  1.6e-2 .. 4.3e-2           2^-8  = 3.9e-3
    fp16   2.0e-3 .. 3.4e-3  1.6e-3 .. 2.5e-3  1.9e-3 .. 4.2e-3           2^-11 = 4.9e-4

(top of each range: SmolLM2, 30 layers). The bounds below leave about 1.7x over the worst of those, and in
addition trilite may be at most twice as far from fp32 as HF's own run in that dtype: the kernels accumulate
in fp32, so they should not be less accurate than HF, and a kernel bug (wrong row, missing bias, bad rope)
costs far more than 2x. The fp32 reference runs on the GPU with TF32 off.

Greedy decoding in half precision flips wherever two candidates are closer than the rounding noise, so it is
compared with HF fp32 over a short horizon (8 tokens in bf16, 16 in fp16), on prompts whose fp32 greedy path
keeps the top-two gap above NEAR_TIE x the logits' RMS at every step (per-entry errors are ~0.02 RMS in bf16
and ~0.0025 in fp16, so those gaps are over five standard deviations of the difference of two entries). The
test re-checks that gap: a failure there means the prompt, not the artifact, needs changing.

Batched-equals-alone is exact only in fp32 (a batch picks other kernel variants, whose different summation
order rounds differently in half precision), so it runs on an fp32 artifact. CUDA-graph decode replays the
same kernels on the same rows as eager decode: equal bit for bit.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e2e.conftest import SMOLLM2, TINY_PRESETS, greedy, hf_logits, hf_model, needs_smollm2, random_prompt, rel_err

pytestmark = pytest.mark.gpu
DEVICE = "cuda"

TOL = {"bf16": {"fp32": 6e-2, "same": 8e-2}, "fp16": {"fp32": 8e-3, "same": 1e-2}}
NO_WORSE_THAN_HF = 2.0
HORIZON = {"bf16": 8, "fp16": 16}
NEAR_TIE = {"bf16": 0.15, "fp16": 0.03}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Seeds of random_prompt(vocab, 5, seed) whose HF fp32 greedy path has no near-tie in 16 steps at NEAR_TIE["fp16"]
# nor in 8 at NEAR_TIE["bf16"]: the first such seed in 0..199 for each preset (found on the CPU).
GREEDY_SEEDS = {"tiny-llama": 118, "tiny-llama3": 19, "tiny-mistral": 101, "tiny-qwen2": 24, "tiny-qwen3": 61,
                "tiny-mqa": 39, "tiny-hd80": 20, "tiny-phi3": 162, "tiny-mistral-swa": 179,
                "tiny-gemma2": 105, "tiny-gemma3": 0, "tiny-mixtral": 84, "tiny-qwen3-moe": 69,
                "tiny-qwen2-moe": 34}
SMOLLM2_GREEDY_TEXT = "1, 2, 3, 4, 5,"  # its fp32 top-two gaps stay >= 0.28 RMS over 12 tokens, 0.13 over 16
MOE_PRESETS = ("tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe")
KV_GB = {"tiny": 0.05, SMOLLM2: 0.5}  # explicit: by default a backend takes 90% of the free memory for KV blocks
CASES = [*((p, d) for p in TINY_PRESETS for d in ("bf16", "fp16")),
         *(pytest.param((SMOLLM2, d), marks=needs_smollm2, id=f"{SMOLLM2}-{d}") for d in ("bf16", "fp16"))]


@functools.cache
def artifact(name: str, dtype: str) -> Path:
    """``name`` compiled for this GPU in ``dtype`` once per process (heuristic configs: no autotune here)."""
    from compiler.build import build, local_target

    out = Path(tempfile.mkdtemp(prefix=f"trilite-e2e-gpu-{name}-{dtype}-")) / name
    if name == SMOLLM2:  # make compile's defaults on a GPU machine, without the autotuning
        # --quant none: the cuda backend refuses --quant gguf artifacts until tests/gpu/test_gguf_gpu.py passes
        build(name, out, targets=[str(local_target())], dtype=dtype, autotune=False, quant="none")
    else:
        build(name, out, targets=[str(local_target())], dtype=dtype, max_seq_len=128, max_batch=8, autotune=False,
              reference=False)
    return out


def engine(name: str, dtype: str, **kw):
    from runtime.engine import load

    return load(artifact(name, dtype), backend="cuda", kv_cache_gb=KV_GB.get(name, KV_GB["tiny"]), **kw)


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}" if isinstance(c, tuple) else None)
def case(request):
    name, dtype = request.param
    eng = engine(name, dtype)
    hfh = hf_model(name, TORCH_DTYPE[dtype], DEVICE)
    yield name, dtype, eng, hf_fp32(name), hfh
    eng.backend.close()
    del eng, hfh
    torch.cuda.empty_cache()


@functools.lru_cache(maxsize=1)  # a preset's bf16 and fp16 cases run one after the other
def hf_fp32(name: str):
    return hf_model(name, torch.float32, DEVICE)


@torch.no_grad()
def greedy_with_gaps(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF greedy tokens and, at each step, the top-two logit gap divided by the row's RMS."""
    prompt = torch.tensor([ids], device=DEVICE)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    gaps = []
    for row in out.scores:
        row = row[0].float()
        top = row.topk(2).values
        gaps.append(float((top[0] - top[1]) / row.pow(2).mean().sqrt()))
    return out.sequences[0, len(ids):].tolist(), gaps


def _logits_prompt(name: str, eng) -> list[int]:
    if name == SMOLLM2:
        return eng.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                 tokenize=True)
    return random_prompt(eng.vocab_size, 40, seed=7)  # five prefill chunks of max_batch 8


def _row_errors(out, ref: torch.Tensor) -> torch.Tensor:
    out = torch.as_tensor(out)  # Engine.logits: numpy fp32
    return (out.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1)


def test_logits_match_transformers(case):
    name, dtype, eng, hf32, hfh = case
    ids = _logits_prompt(name, eng)
    out, ref32, refh = eng.logits(ids), hf_logits(hf32, ids), hf_logits(hfh, ids)
    err32, err_same, hf_err32 = rel_err(out, ref32), rel_err(out, refh), rel_err(refh, ref32)
    report = f"{name} {dtype}: vs fp32 {err32:.2e}, vs HF {dtype} {err_same:.2e}, HF {dtype} vs fp32 {hf_err32:.2e}"
    if name in MOE_PRESETS:
        # A token whose k-th and (k+1)-th experts lie within the dtype's rounding routes either way, and its row then
        # differs wholesale (on the CPU in bf16, HF's own run has 6-8 of these 40 rows over 6e-2 from fp32; trilite's
        # torch backend 1-8, its median row 0.016-0.021 against HF's 0.032-0.034). So: the median row within half
        # the bound, and no more rows over it than HF's own run has plus a tenth of the rows.
        rows, hf_rows = _row_errors(out, ref32), _row_errors(refh, ref32)
        tol = TOL[dtype]["fp32"]
        off, hf_off = int((rows > tol).sum()), int((hf_rows > tol).sum())
        report += f"; median row {float(rows.median()):.2e}, rows over {tol}: {off} (HF {hf_off}) of {len(rows)}"
        assert float(rows.median()) <= tol / 2 and off <= hf_off + len(rows) // 10, report
        return
    assert err32 <= TOL[dtype]["fp32"] and err_same <= TOL[dtype]["same"], report
    assert err32 <= NO_WORSE_THAN_HF * hf_err32, report


def test_greedy_matches_transformers_fp32(case):
    name, dtype, eng, hf32, _ = case
    ids = eng.tokenizer.encode(SMOLLM2_GREEDY_TEXT) if name == SMOLLM2 else \
        random_prompt(eng.vocab_size, 5, seed=GREEDY_SEEDS[name])
    n = HORIZON[dtype]
    expected, gaps = greedy_with_gaps(hf32, ids, n)
    assert min(gaps) >= NEAR_TIE[dtype], f"prompt has a near-tie (gaps {gaps}): choose another for {name}"
    got = eng.generate([ids], greedy(n))[0].token_ids
    assert got == expected


def _recording(backend, steps: list):
    """The cuda backend's ``_forward`` (what submit enqueues) that also appends (kind, S, a host copy of the logits)
    of every step to ``steps``; reading them waits for the step, which changes no value."""
    forward = backend._forward

    def run(step, feed=None):
        rows = forward(step, feed)
        steps.append((step.kind, step.S, backend.program.logits_host(rows)))
        return rows
    return run


def test_cuda_graph_decode_equals_eager(case):
    name, dtype, graphs, _, _ = case
    eager = engine(name, dtype, cuda_graphs=False)
    try:
        assert graphs.backend._buckets and not eager.backend._buckets
        prompts = [random_prompt(graphs.vocab_size, n, seed=50 + n) for n in (1, 3, 9, 16, 17, 24, 31, 40)]
        params = [greedy(m) for m in (9, 4, 12, 7, 16, 3, 11, 8)]  # the batch shrinks through several buckets
        runs = []
        for eng in (graphs, eager):
            steps: list = []
            eng.backend._forward = _recording(eng.backend, steps)
            try:
                runs.append(([o.token_ids for o in eng.generate(prompts, params)], steps))
            finally:
                del eng.backend._forward
        (tokens_g, steps_g), (tokens_e, steps_e) = runs
        assert tokens_g == tokens_e
        assert [(k, s) for k, s, _ in steps_g] == [(k, s) for k, s, _ in steps_e]
        decode = [(a, b) for (k, _, a), (_, _, b) in zip(steps_g, steps_e) if k == "decode"]
        assert len({s for k, s, _ in steps_g if k == "decode"}) >= 3, "expected decode steps of several batch sizes"
        for i, (a, b) in enumerate(decode):
            assert np.array_equal(a, b), f"decode step {i}: graph replay differs from eager launch"
    finally:
        eager.backend.close()


@needs_smollm2
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_smollm2_names_paris_and_verifies(dtype):
    """The chat answer in half precision. Its first token is a near-tie in fp32 ("The" 25.33 vs "L" 25.24, less
    than one bf16 step at 25), so the answer is started with "The" and the rest must name Paris."""
    from runtime.verify import verify_engine

    eng = engine(SMOLLM2, dtype)
    try:
        ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                tokenize=True)
        ids += eng.tokenizer.encode("The", add_special_tokens=False)
        text = eng.generate([ids], greedy(12))[0].text
        assert "Paris" in text, text
        result = verify_engine(eng)  # what `runtime verify` checks, against the reference stored at build time
        assert result.passed, result.lines()
    finally:
        eng.backend.close()


def test_batched_equals_alone_fp32():
    eng = engine("tiny-llama3", "fp32")
    try:
        prompts = [random_prompt(eng.vocab_size, n, seed=n) for n in (1, 2, 5, 11, 16, 17, 30, 47)]
        params = [greedy(m) for m in (12, 5, 16, 9, 3, 14, 7, 10)]
        alone = [eng.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
        assert [o.token_ids for o in eng.generate(prompts, params)] == alone
    finally:
        eng.backend.close()
