import dataclasses

import pytest
import torch

from kernels.moe import SPEC, configs, default, moe, reference

# (T, D, I, E, top_k): one token, a decode batch, awkward sizes (not powers of two, partial row and K tiles),
# top-1 and top-k = E.
CASES = [(1, 64, 32, 4, 2), (5, 48, 40, 8, 2), (9, 100, 70, 6, 3), (3, 32, 24, 5, 1), (4, 40, 16, 3, 3)]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
# The two forms: the per-(token, k) GEMVs (one-token steps) and the grouped tl.dot tiles (kernels/moe_grouped.py).
SHAPE = {"E": 8, "D": 64, "I": 32, "top_k": 2, "max_T": 64, "max_S": 4}
FORMS = {"gemv": default({**SHAPE, "T_bucket": 1}), "grouped": default({**SHAPE, "T_bucket": 16})}


def _inputs(T, D, I, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + T * 31 + D + E)
    x = torch.randn(T, D, generator=g).to(dtype)
    # A router of std 1 spreads the tokens over the experts (and keeps the top-k probabilities apart).
    router = torch.randn(E, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype)
    residual = torch.randn(T, D, generator=g).to(dtype)
    return x, router, w13, w2, residual


def maths(x, router, w13, w2, residual, top_k, renormalize):
    """The MoE MLP token by token in float64 (softmax over all experts, top-k, optional renormalisation)."""
    I = w13.shape[1] // 2
    out = residual.double().clone()
    probs = _probs(x, router)
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], top_k)
        weights = top.values / top.values.sum() if renormalize else top.values
        for w, e in zip(weights, top.indices.tolist()):
            gate, up = (w13[e].double() @ x[t].double()).split(I)
            out[t] += w * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


def _probs(x, router):
    """Router probabilities in float64 of logits rounded to x's dtype, as HF's F.linear leaves them."""
    return torch.softmax((x.double() @ router.double().T).to(x.dtype).double(), dim=-1)


def _scratch(T, I, top_k, dtype):
    return {"act": torch.full((T * top_k * I,), float("nan"), dtype=dtype),
            "topk_ids": torch.full((T * top_k,), -7, dtype=torch.int32),
            "topk_weights": torch.full((T * top_k,), float("nan"))}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("T,D,I,E,top_k", CASES)
def test_moe_matches_the_maths(T, D, I, E, top_k, dtype, atol, rtol, renormalize, form):
    x, router, w13, w2, residual = _inputs(T, D, I, E, dtype)
    out = torch.full((T, D), float("nan"), dtype=dtype)
    scratch = _scratch(T, I, top_k, dtype)
    moe(x, router, w13, w2, residual, top_k=top_k, renormalize=renormalize, out=out, scratch=scratch,
        config=FORMS[form])
    # The router's choice and weights, from the maths on the same (rounded) inputs.
    top = torch.topk(_probs(x, router), top_k, dim=-1)
    assert torch.equal(scratch["topk_ids"].view(T, top_k).long(), top.indices)
    want_w = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    torch.testing.assert_close(scratch["topk_weights"].view(T, top_k).double(), want_w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.double(), maths(x, router, w13, w2, residual, top_k, renormalize),
                               atol=atol * 10, rtol=rtol * 10)
    torch.testing.assert_close(out, reference(x, router, w13, w2, residual, top_k=top_k, renormalize=renormalize),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("form", FORMS)
def test_tokens_of_one_batch_take_different_experts(form):
    # The case the model tests depend on: without it, a kernel reading one expert for the whole batch would pass.
    x, router, w13, w2, residual = _inputs(8, 64, 32, 8, torch.float32, seed=3)
    scratch = _scratch(8, 32, 2, torch.float32)
    out = moe(x, router, w13, w2, residual, top_k=2, renormalize=True, scratch=scratch, config=FORMS[form])
    assert len(set(scratch["topk_ids"].tolist())) >= 4
    torch.testing.assert_close(out.double(), maths(x, router, w13, w2, residual, 2, True), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_out_may_alias_residual(form):
    x, router, w13, w2, residual = _inputs(6, 48, 40, 4, torch.float32, seed=5)
    want = maths(x, router, w13, w2, residual, 2, False)
    moe(x, router, w13, w2, residual, top_k=2, renormalize=False, out=residual, config=FORMS[form])
    torch.testing.assert_close(residual.double(), want, atol=1e-4, rtol=1e-4)


def _all_configs(meta):
    return list(dict.fromkeys(c for bucket in (1, 16, 256) for c in configs({**meta, "T_bucket": bucket})))


@pytest.mark.parametrize("config", _all_configs({"E": 4, "D": 200, "I": 150, "top_k": 2, "max_T": 256}), ids=str)
def test_every_config_covers_the_rows(config):
    # Partial row and K tiles everywhere; for the grouped form 37 tokens, several token tiles per expert.
    T = 37 if "BLOCK_M" in dict(config.constexprs) else 3
    x, router, w13, w2, residual = _inputs(T, 200, 150, 4, torch.float32, seed=7)
    out = torch.full((T, 200), float("nan"))
    moe(x, router, w13, w2, residual, top_k=2, renormalize=True, out=out, config=config)
    torch.testing.assert_close(out.double(), maths(x, router, w13, w2, residual, 2, True), atol=1e-4, rtol=1e-4)


def test_bad_top_k_is_refused():
    x, router, w13, w2, residual = _inputs(2, 32, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="top_k 5 must be between 1 and the number of experts 4"):
        moe(x, router, w13, w2, residual, top_k=5, renormalize=True)


@pytest.mark.parametrize("bucket,launches", [(1, 3), (256, 6)])
def test_moe_cross_compiles(bucket, launches):
    # Every candidate in bf16 (Mixtral-8x7B's shape); the defaults in fp32 (tiles of twice the memory) with a shared
    # expert (Qwen2-MoE's epilogue) below.
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {"E": 8, "D": 4096, "I": 14336, "top_k": 2, "renormalize": True, "max_T": 256, "max_S": 8,
            "T_bucket": bucket}
    dtypes = {r: "bf16" for r in ("x", "router", "w13", "w2", "residual", "out")}
    assert assert_cross_compiles(SPEC, meta, dtypes) == 3 * launches * len(set([*configs(meta), default(meta)]))
    fp32 = dataclasses.replace(SPEC, configs=lambda meta: [])
    dtypes = dict.fromkeys([*dtypes, "shared", "shared_gate"], "fp32")
    assert assert_cross_compiles(fp32, {**meta, "has_shared": True}, dtypes) == 3 * launches


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_shared_expert_is_gated_and_added(form, dtype, atol, rtol):
    # Qwen2-MoE: residual + experts + sigmoid(x @ shared_gate^T) * shared, the shared expert's output given.
    T, D, I, E = 7, 48, 40, 6
    x, router, w13, w2, residual = _inputs(T, D, I, E, dtype, seed=9)
    g = torch.Generator().manual_seed(19)
    shared, shared_gate = torch.randn(T, D, generator=g).to(dtype), torch.randn(1, D, generator=g).to(dtype)
    out = torch.full((T, D), float("nan"), dtype=dtype)
    scratch = {**_scratch(T, I, 2, dtype), "shared_weight": torch.full((T,), float("nan"))}
    moe(x, router, w13, w2, residual, shared, shared_gate, top_k=2, renormalize=False, out=out, scratch=scratch,
        config=FORMS[form])
    gate = torch.sigmoid(x.double() @ shared_gate.double().T)
    torch.testing.assert_close(scratch["shared_weight"].double(), gate[:, 0], atol=atol * 10, rtol=rtol * 10)
    want = maths(x, router, w13, w2, residual, 2, False) + gate * shared.double()
    torch.testing.assert_close(out.double(), want, atol=atol * 10, rtol=rtol * 10)
    torch.testing.assert_close(out, reference(x, router, w13, w2, residual, shared, shared_gate, top_k=2,
                                              renormalize=False), atol=atol, rtol=rtol)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_a_nan_row_still_names_real_experts():
    # The expert kernels index weights by the router's ids: a row of NaNs must not send them out of bounds.
    x, router, w13, w2, residual = _inputs(3, 32, 16, 5, torch.float32, seed=13)
    x[1] = float("nan")
    scratch = _scratch(3, 16, 2, torch.float32)
    moe(x, router, w13, w2, residual, top_k=2, renormalize=True, scratch=scratch, config=FORMS["gemv"])
    ids = scratch["topk_ids"].view(3, 2)
    assert ((ids >= 0) & (ids < 5)).all(), ids
    assert torch.equal(ids[[0, 2]].long(), torch.topk(_probs(x[[0, 2]], router), 2).indices)
