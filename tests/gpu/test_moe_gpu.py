"""The moe kernels (kernels/moe.py, kernels/moe_grouped.py) on the GPU in bf16 / fp16 / fp32 against the maths.

Both forms: the GEMVs of one-token steps and the grouped tl.dot tiles of larger ones, at Mixtral-8x7B's expert
shape (8 experts, top 2, D 4096, I 14336), Qwen3-30B-A3B's (128 experts, top 8, D 2048, I 768), Qwen1.5-MoE's
(60 experts, top 4, not renormalised, D 2048, I 1408, with a shared expert's gated output added), and every
candidate config once in bf16. The maths runs in fp32 from the same (rounded) inputs: softmax over all experts of
logits rounded to the dtype (as HF's F.linear leaves them), top-k, renormalised or not, SwiGLU experts.

Routing: a token whose k-th and (k+1)-th logits lie within two units in the last place of the dtype can go either
way, so such tokens are left out of the output comparison (at most half of them; at least one token is kept). The
kernels round the gate_up product, the activation and each expert's output to the dtype where HF does, the maths
does not: per-row relative error bounds of 2e-2 (bf16), 3e-3 (fp16), 1e-4 (fp32).
The tiny-mixtral and tiny-qwen3-moe models run against HF in bf16 / fp16 in tests/gpu/test_e2e_gpu.py (with every
tiny preset). Run: ``python -m pytest -q -m gpu tests/gpu/test_moe_gpu.py tests/gpu/test_e2e_gpu.py -k "moe or
mixtral"``.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import configs, default, moe

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
# (E, top_k, D, I, renormalize, shared expert)
SHAPES = {"mixtral": (8, 2, 4096, 14336, True, False), "qwen3-moe": (128, 8, 2048, 768, True, False),
          "qwen2-moe": (60, 4, 2048, 1408, False, True), "small-raw": (6, 3, 1024, 512, False, False)}
TOKENS = [1, 7, 64, 300]


# The inputs' seed: with it every case of test_moe_matches_the_maths keeps enough decisively routed tokens (checked
# on the CPU, where _routing draws; seed 0 left Qwen3-MoE's one bf16 token on a near-tie).
SEED = 1


def _routing(E, D, T, dtype, seed=SEED):
    """x and the router weight, drawn on the CPU so that which tokens route decisively is the same on every
    machine."""
    g = torch.Generator().manual_seed(seed + T)
    x = torch.randn(T, D, generator=g).to(dtype)
    router = (torch.randn(E, D, generator=g) / D ** 0.5 * 3).to(dtype)
    return x, router


def _inputs(E, D, I, T, dtype, seed=SEED):
    x, router = (t.to(CUDA) for t in _routing(E, D, T, dtype, seed))
    g = torch.Generator(device=CUDA).manual_seed(seed + T)
    w13 = (torch.randn(E, 2 * I, D, generator=g, device=CUDA) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g, device=CUDA) / I ** 0.5).to(dtype)
    residual = torch.randn(T, D, generator=g, device=CUDA).to(dtype)
    shared = torch.randn(T, D, generator=g, device=CUDA).to(dtype)
    shared_gate = (torch.randn(1, D, generator=g, device=CUDA) / D ** 0.5).to(dtype)
    return x, router, w13, w2, residual, shared, shared_gate


def _maths(x, router, w13, w2, residual, shared, shared_gate, top_k, renormalize):
    """-> (out [T, D] fp32, decisive [T] bool: tokens whose k-th logit is clear of the (k+1)-th by two units in the
    last place of the dtype, more than a different fp32 summation order can move a rounded logit)."""
    I = w13.shape[1] // 2
    logits = (x.float() @ router.float().T).to(x.dtype).float()
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    ranked = logits.sort(dim=-1, descending=True).values
    decisive = torch.ones(len(x), dtype=torch.bool, device=x.device)
    if top_k < logits.shape[1]:
        ulp = torch.finfo(x.dtype).eps * ranked[:, top_k - 1].abs().clamp(min=1.0)
        decisive = ranked[:, top_k - 1] - ranked[:, top_k] > 2 * ulp
    out = residual.float().clone()
    for e in ids.unique().tolist():
        t, k = torch.where(ids == e)
        gate, up = (x[t].float() @ w13[e].float().T).split(I, dim=-1)
        out.index_add_(0, t, weights[t, k, None] * ((torch.nn.functional.silu(gate) * up) @ w2[e].float().T))
    if shared is not None:
        out += torch.sigmoid(x.float() @ shared_gate.float().T) * shared.float()
    return out, decisive


def _check(out, want, decisive, dtype):
    assert decisive.any() and (len(decisive) < 8 or decisive.float().mean() >= 0.5), \
        f"{int((~decisive).sum())} of {len(decisive)} routings are near-ties: change the inputs' seed"
    err = (out.float() - want).norm(dim=-1) / want.norm(dim=-1)
    assert torch.isfinite(out).all()
    assert float(err[decisive].max()) <= TOL[dtype], f"worst row relative error {float(err[decisive].max()):.2e}"


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
def test_moe_matches_the_maths(shape, T, dtype):
    E, top_k, D, I, renormalize, has_shared = SHAPES[shape]
    x, router, w13, w2, residual, shared, shared_gate = _inputs(E, D, I, T, dtype)
    if not has_shared:
        shared = shared_gate = None
    out = torch.full((T, D), float("nan"), dtype=dtype, device=CUDA)
    # the GEMVs at T 1, the grouped form above
    moe(x, router, w13, w2, residual, shared, shared_gate, top_k=top_k, renormalize=renormalize, out=out)
    _check(out, *_maths(x, router, w13, w2, residual, shared, shared_gate, top_k, renormalize), dtype)


@pytest.mark.parametrize("bucket", [1, 16, 256])
def test_every_config_in_bf16(bucket):
    E, top_k, D, I, renormalize, _ = SHAPES["mixtral"]
    meta = {"E": E, "D": D, "I": I, "top_k": top_k, "max_T": 256, "max_S": 8, "T_bucket": bucket}
    T = bucket if bucket > 1 else 1
    x, router, w13, w2, residual, _, _ = _inputs(E, D, I, T, torch.bfloat16, seed=11)
    want = _maths(x, router, w13, w2, residual, None, None, top_k, renormalize)
    for config in dict.fromkeys([*configs(meta), default(meta)]):
        out = torch.full((T, D), float("nan"), dtype=torch.bfloat16, device=CUDA)
        moe(x, router, w13, w2, residual, top_k=top_k, renormalize=renormalize, out=out, config=config)
        _check(out, *want, torch.bfloat16)
