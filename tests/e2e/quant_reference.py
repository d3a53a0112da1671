"""The transformers side of the quantized e2e tests (test_quant.py, test_quant_int4.py), built from the schemes'
definitions, not from the artifact or the compiler, and the checks both files run against it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from runtime.engine import load
from tests.e2e.conftest import first_difference, greedy, hf_greedy, hf_logits, hf_model, random_prompt, rel_err

GEN_TOKENS = 32


@torch.no_grad()
def quantize_like_the_artifact(model, round_trip: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Each linear's weight through ``round_trip`` as the artifact holds it: the norm in front folded in first
    (Gemma's norms scale by 1 + w), rounded, divided back out, which transformers' norm then multiplies back in.
    Phi-3's fused qkv_proj / gate_up_proj are one matrix each; MoE experts stay as they are. Row permutations (rope
    pairing, gate/up interleave) and merges move whole rows, which change neither a per-row nor a per-group-along-K
    rounding."""
    gemma = model.config.model_type.startswith("gemma")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.qkv_proj,) if hasattr(attn, "qkv_proj") else (attn.q_proj, attn.k_proj, attn.v_proj)
        groups = [(layer.input_layernorm, qkv), (None, (attn.o_proj,))]
        if hasattr(mlp, "experts"):
            # A sparse layer: the router and the experts are the moe node's, which keeps them unquantized; a shared
            # expert's linears read the post-attention norm's output as it is (the moe node reads it too, so the
            # norm stays a kernel and folds into nothing).
            shared = getattr(mlp, "shared_expert", None)
            if shared is not None:
                groups.append((None, (shared.gate_proj, shared.up_proj, shared.down_proj)))
        else:
            gate_up = (mlp.gate_up_proj,) if hasattr(mlp, "gate_up_proj") else (mlp.gate_proj, mlp.up_proj)
            ffn_norm = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
            groups += [(ffn_norm, gate_up), (None, (mlp.down_proj,))]
        for norm, linears in groups:
            for lin in linears:
                g = torch.ones(lin.in_features) if norm is None else norm.weight.float() + (1 if gemma else 0)
                lin.weight.copy_(round_trip(lin.weight.float() * g) / g)


def check_logits(path: Path, model, name: str, backend: str, seed: int) -> None:
    """The artifact's logits within 1e-4 of transformers on the rounded weights, same argmax, and measurably further
    from the unquantized model (the quantization is real)."""
    prompt = random_prompt(model.config.vocab_size, 11, seed=seed)
    ref = hf_logits(model, prompt)
    out = load(path, backend=backend).logits(prompt)
    err = rel_err(out, ref)
    assert err <= 1e-4, f"{backend}: relative error {err:.2e}"
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert rel_err(out, hf_logits(hf_model(name), prompt)) > 10 * max(err, 1e-7)


def check_greedy(path: Path, model, backend: str, seed: int) -> None:
    """GEN_TOKENS greedy tokens identical to transformers' on the rounded weights."""
    prompt = random_prompt(model.config.vocab_size, 5, seed=seed)
    ref = hf_greedy(model, prompt, GEN_TOKENS)
    assert len(set(ref)) >= 8, ref
    out = load(path, backend=backend).generate([prompt], greedy(GEN_TOKENS))[0]
    assert out.token_ids == ref, f"{backend}: first difference at token {first_difference(out.token_ids, ref)}"


def check_verify(path: Path) -> None:
    from runtime.verify import verify

    result = verify(path, backend="torch")
    assert result.passed and result.rel_err <= 1e-4, result.lines()
